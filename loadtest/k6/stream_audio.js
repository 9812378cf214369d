// k6 load test for streaminfer: real-time audio streams over the bidirectional
// streaminfer.v1.InferenceService/Stream call, found through server reflection.
//
//   k6 run loadtest/k6/stream_audio.js
//   k6 run -e STREAMINFER_ADDR=127.0.0.1:50051 -e SCENARIO=arrival -e RATE=3 loadtest/k6/stream_audio.js
//
// Each iteration opens one stream, sends the config, then the WAV's audio in
// 32 ms chunks paced in real time by timers, then END_OF_INPUT, and reads
// every response until the server ends the call. Metrics:
//   chunk_latency         Trend: ms from a chunk's write to the ack covering it
//   time_to_first_result  Trend: ms from the first chunk's write to the first result
//   chunk_errors          Counter, tagged with the ChunkError reason
//   chunk_error_rate      Rate: chunks answered with a ChunkError / chunks answered
//   chunks_unanswered     Counter: chunks with neither ack nor error when the call ended
//   stream_errors         Counter: calls that ended with a gRPC error, tagged with the code
// The message templates live in messages.json so the tests can check them
// against the proto.

import { Client, Stream } from 'k6/net/grpc';
import { Counter, Rate, Trend } from 'k6/metrics';
import { SharedArray } from 'k6/data';
import { b64encode } from 'k6/encoding';
import { setTimeout } from 'k6/timers';

const ADDR = __ENV.STREAMINFER_ADDR || '127.0.0.1:50051';
const WAV_PATH = __ENV.STREAMINFER_WAV || '../../media/audio/speech_sample.wav';
const MAX_SECONDS = Number(__ENV.MAX_SECONDS || '0'); // 0: the whole file
const SCENARIO = __ENV.SCENARIO || 'both'; // constant, arrival or both
const VUS = Number(__ENV.VUS || '10');
const RATE = Number(__ENV.RATE || '2'); // new streams per second (arrival)
const DURATION = __ENV.DURATION || '1m';

// Init context: the templates and the audio are read once.
const TEMPLATES = JSON.parse(open('./messages.json'));

// Finds a RIFF chunk ("fmt " or "data") and returns [offset of its body, size].
function findWavChunk(view, id) {
  let offset = 12;
  while (offset + 8 <= view.byteLength) {
    let name = '';
    for (let i = 0; i < 4; i++) {
      name += String.fromCharCode(view.getUint8(offset + i));
    }
    const size = view.getUint32(offset + 4, true);
    if (name === id) {
      return [offset + 8, size];
    }
    offset += 8 + size + (size % 2);
  }
  throw new Error(`WAV chunk "${id}" not found in ${WAV_PATH}`);
}

// The WAV header and the base64 chunks, computed once and shared by all VUs.
const AUDIO = new SharedArray('streaminfer audio', function () {
  const buffer = open(WAV_PATH, 'b');
  const view = new DataView(buffer);
  const [fmtAt] = findWavChunk(view, 'fmt ');
  const format = view.getUint16(fmtAt, true);
  const channels = view.getUint16(fmtAt + 2, true);
  const rate = view.getUint32(fmtAt + 4, true);
  const bits = view.getUint16(fmtAt + 14, true);
  if (format !== 1 || bits !== 16) {
    throw new Error(`${WAV_PATH}: expected PCM16, got format ${format} with ${bits} bits`);
  }
  const [dataAt, dataSize] = findWavChunk(view, 'data');
  const frameBytes = 2 * channels;
  const chunkBytes = ((rate * TEMPLATES.chunkMs) / 1000) * frameBytes;
  let usable = Math.min(dataSize, buffer.byteLength - dataAt);
  if (MAX_SECONDS > 0) {
    usable = Math.min(usable, Math.floor(MAX_SECONDS * rate) * frameBytes);
  }
  const count = Math.floor(usable / chunkBytes);
  const rows = [{ rate: rate, channels: channels, chunkBytes: chunkBytes, count: count }];
  for (let i = 0; i < count; i++) {
    const start = dataAt + i * chunkBytes;
    rows.push(b64encode(buffer.slice(start, start + chunkBytes)));
  }
  return rows;
});

const chunkLatency = new Trend('chunk_latency', true);
const timeToFirstResult = new Trend('time_to_first_result', true);
const chunkErrors = new Counter('chunk_errors');
const chunkErrorRate = new Rate('chunk_error_rate');
const chunksUnanswered = new Counter('chunks_unanswered');
const streamErrors = new Counter('stream_errors');

const scenarios = {};
if (SCENARIO === 'constant' || SCENARIO === 'both') {
  scenarios.steady_streams = {
    executor: 'constant-vus',
    exec: 'streamAudio',
    vus: VUS,
    duration: DURATION,
    gracefulStop: '30s',
  };
}
if (SCENARIO === 'arrival' || SCENARIO === 'both') {
  scenarios.arriving_streams = {
    executor: 'constant-arrival-rate',
    exec: 'streamAudio',
    rate: RATE,
    timeUnit: '1s',
    duration: DURATION,
    // Each stream lasts about the audio's length (9.5 s for the sample).
    preAllocatedVUs: Math.max(1, RATE * 12),
    maxVUs: Math.max(2, RATE * 30),
    startTime: SCENARIO === 'both' ? '80s' : '0s',
    gracefulStop: '30s',
  };
}

export const options = {
  scenarios: scenarios,
  thresholds: {
    chunk_latency: ['p(99)<100'],
    chunk_error_rate: ['rate<0.01'],
    time_to_first_result: ['p(95)<1000'],
    stream_errors: ['count<1'],
    chunks_unanswered: ['count<1'],
  },
};

const client = new Client();
let connected = false;

// Copies a template so one stream's edits never reach another stream.
function copy(template) {
  return JSON.parse(JSON.stringify(template));
}

export function configMessage(rate, channels) {
  const message = copy(TEMPLATES.config);
  message.config.audioFormat.sampleRateHertz = rate;
  message.config.audioFormat.audioChannelCount = channels;
  return message;
}

export function audioMessage(sequenceNumber, audioContent) {
  const message = copy(TEMPLATES.audio);
  // int64 travels as a string in the proto3 JSON mapping.
  message.audio.sequenceNumber = String(sequenceNumber);
  message.audio.audioContent = audioContent;
  return message;
}

export function endOfInputMessage() {
  return copy(TEMPLATES.endOfInput);
}

export function streamAudio() {
  if (!connected) {
    client.connect(ADDR, { plaintext: true, reflect: true, timeout: '10s' });
    connected = true;
  }
  const info = AUDIO[0];
  const sentAt = new Map(); // sequence number -> write time in ms
  let firstChunkAt = 0;
  let gotResult = false;

  const stream = new Stream(client, TEMPLATES.method);

  stream.on('data', (response) => {
    const now = Date.now();
    const results = response.results || [];
    if (!gotResult && results.length > 0 && firstChunkAt > 0) {
      gotResult = true;
      timeToFirstResult.add(now - firstChunkAt);
    }
    for (const ack of response.acks || []) {
      const first = Number(ack.firstSequenceNumber || 0);
      const last = Number(ack.lastSequenceNumber || 0);
      for (let seq = first; seq <= last; seq++) {
        if (sentAt.has(seq)) {
          chunkLatency.add(now - sentAt.get(seq));
          chunkErrorRate.add(false);
          sentAt.delete(seq);
        }
      }
    }
    for (const error of response.errors || []) {
      const seq = Number(error.sequenceNumber || 0);
      chunkErrors.add(1, { reason: String(error.reason || 'CHUNK_ERROR_REASON_UNSPECIFIED') });
      chunkErrorRate.add(true);
      sentAt.delete(seq);
    }
  });

  stream.on('error', (error) => {
    streamErrors.add(1, { code: String(error && error.code !== undefined ? error.code : 'unknown') });
  });

  stream.on('end', () => {
    if (sentAt.size > 0) {
      chunksUnanswered.add(sentAt.size);
      sentAt.clear();
    }
  });

  stream.write(configMessage(info.rate, info.channels));

  // Chunk i is due chunkMs * i after the first one. Each timer aims at that
  // due time, so one late timer does not delay the chunks after it.
  const start = Date.now();
  let next = 0;
  const sendNext = () => {
    if (next >= info.count) {
      stream.write(endOfInputMessage());
      stream.end();
      return;
    }
    const now = Date.now();
    if (next === 0) {
      firstChunkAt = now;
    }
    sentAt.set(next, now);
    stream.write(audioMessage(next, AUDIO[next + 1]));
    next += 1;
    const due = start + next * TEMPLATES.chunkMs;
    setTimeout(sendNext, Math.max(0, due - Date.now()));
  };
  sendNext();
}

export default streamAudio;
