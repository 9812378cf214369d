"""Locust load test for streaminfer: real-time audio over the bidirectional Stream call.

    locust -f loadtest/locustfile.py --host 127.0.0.1:50051
    locust -f loadtest/locustfile.py --headless -u 20 -r 5 -t 2m --host 127.0.0.1:50051

Each task opens one ``streaminfer.v1.InferenceService/Stream`` call with the
generated stubs, sends the config, the WAV's audio in 32 ms chunks paced in real
time, then END_OF_INPUT, and reads every response. It reports three kinds of
request events (request type ``grpc-stream``):

* ``chunk`` -- one per audio chunk: ms from its send to the ack that covers it;
  a ChunkError is a failure whose message starts with the reason.
* ``time to first result`` -- one per stream: ms from the first chunk to the
  first result.
* ``stream`` -- one per stream: the whole call; a gRPC error is a failure.

Locust runs users as gevent greenlets, so ``grpc.experimental.gevent.init_gevent()``
is called after Locust has monkey-patched the standard library (on import) and
before any channel exists; blocking gRPC calls then yield to other users.

Environment: ``STREAMINFER_WAV`` (PCM16 WAV, default media/audio/speech_sample.wav),
``STREAMINFER_MAX_SECONDS`` (stream only the start of the audio; default the whole
file), ``STREAMINFER_MODEL`` (default silero_vad).
"""

from __future__ import annotations

import os
import pathlib
import time
import wave
from collections.abc import Iterator

import gevent
from locust import User, between, task

import grpc
import grpc.experimental.gevent

grpc.experimental.gevent.init_gevent()

from streaminfer.v1 import streaminfer_pb2 as pb  # noqa: E402
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
WAV_PATH = pathlib.Path(os.environ.get("STREAMINFER_WAV", REPO_ROOT / "media" / "audio" / "speech_sample.wav"))
MAX_SECONDS = float(os.environ.get("STREAMINFER_MAX_SECONDS", "0"))  # 0: the whole file
MODEL = os.environ.get("STREAMINFER_MODEL", "silero_vad")
CHUNK_MS = 32
REQUEST_TYPE = "grpc-stream"


class ChunkError(Exception):
    """A chunk the server rejected with a ChunkError instead of an ack."""


class StreamIncomplete(Exception):
    """The call ended with chunks that got neither an ack nor an error."""


def load_chunks(path: pathlib.Path) -> tuple[int, int, list[bytes]]:
    """Return (sample rate, channels, PCM16 chunks of CHUNK_MS) from a WAV file."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM")
        rate, channels = wav.getframerate(), wav.getnchannels()
        frames = wav.readframes(wav.getnframes())
    if MAX_SECONDS > 0:
        frames = frames[: int(MAX_SECONDS * rate) * 2 * channels]
    size = rate * CHUNK_MS // 1000 * 2 * channels
    return rate, channels, [frames[i : i + size] for i in range(0, len(frames) - size + 1, size)]


SAMPLE_RATE, CHANNELS, CHUNKS = load_chunks(WAV_PATH)


class StreamingAudioUser(User):
    """One user runs one real-time audio stream at a time."""

    host = "127.0.0.1:50051"
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(self.host)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    def fire(self, name: str, response_time_ms: float, length: int = 0, exception: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type=REQUEST_TYPE,
            name=name,
            response_time=response_time_ms,
            response_length=length,
            exception=exception,
            context={},
        )

    @task
    def stream_audio(self) -> None:
        sent_at: dict[int, float] = {}
        first_chunk_at: list[float] = []

        def requests() -> Iterator[pb.StreamRequest]:
            yield pb.StreamRequest(
                config=pb.StreamConfig(
                    models=[pb.ModelSelection(model=MODEL)],
                    audio_format=pb.AudioFormat(
                        encoding=pb.AUDIO_ENCODING_LINEAR16,
                        sample_rate_hertz=SAMPLE_RATE,
                        audio_channel_count=CHANNELS,
                    ),
                    interim_results=True,
                    label="locust",
                )
            )
            start = time.monotonic()
            for sequence, content in enumerate(CHUNKS):
                # Chunk i is due CHUNK_MS * i after the first, whatever the delays before it.
                delay = start + sequence * CHUNK_MS / 1000 - time.monotonic()
                if delay > 0:
                    gevent.sleep(delay)
                now = time.monotonic()
                if not first_chunk_at:
                    first_chunk_at.append(now)
                sent_at[sequence] = now
                yield pb.StreamRequest(audio=pb.AudioChunk(sequence_number=sequence, audio_content=content))
            yield pb.StreamRequest(control=pb.StreamControl(action=pb.CONTROL_ACTION_END_OF_INPUT))

        chunk_bytes = len(CHUNKS[0]) if CHUNKS else 0
        stream_start = time.monotonic()
        got_result = False
        # The timeout bounds a stuck server: a healthy call ends soon after its audio.
        call = self.stub.Stream(requests(), timeout=len(CHUNKS) * CHUNK_MS / 1000 + 30)
        try:
            for response in call:
                now = time.monotonic()
                if response.results and not got_result and first_chunk_at:
                    got_result = True
                    self.fire("time to first result", (now - first_chunk_at[0]) * 1000)
                for ack in response.acks:
                    for sequence in range(ack.first_sequence_number, ack.last_sequence_number + 1):
                        sent = sent_at.pop(sequence, None)
                        if sent is not None:
                            self.fire("chunk", (now - sent) * 1000, chunk_bytes)
                for error in response.errors:
                    sent = sent_at.pop(error.sequence_number, now)
                    reason = pb.ChunkErrorReason.Name(error.reason)
                    self.fire("chunk", (now - sent) * 1000, chunk_bytes, ChunkError(f"{reason}: {error.message}"))
        except grpc.RpcError as error:
            elapsed = (time.monotonic() - stream_start) * 1000
            self.fire("stream", elapsed, exception=error)
            return
        finally:
            call.cancel()  # no-op after a normal end; frees the call if the user is stopped
        elapsed = (time.monotonic() - stream_start) * 1000
        unanswered = len(sent_at)
        problem = StreamIncomplete(f"{unanswered} chunks unanswered") if unanswered else None
        self.fire("stream", elapsed, len(CHUNKS) * chunk_bytes, problem)
