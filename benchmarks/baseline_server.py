"""The server a team writes before it has streaminfer: one VAD call per audio chunk, no batching.

A plain grpc.aio handler for the streaminfer Stream RPC. Each stream keeps
its own Silero VAD state (the LSTM state and the 64 samples of context before
the next window) and calls the model once per 512-sample window, at batch 1,
on the event loop, then acknowledges the chunk. Nothing is queued or batched
across streams, and there is no flow control beyond gRPC's own.

It speaks enough of the protocol for the same load generators to drive it:
session config, audio chunks, a ChunkAck per chunk, a VAD result per speech
start and end, and a StreamEnd. It accepts 16 kHz mono LINEAR16 audio only.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import grpc
import numpy as np
import torch
import uvloop
from silero_vad import load_silero_vad

from echo_server import serve
from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

WINDOW = 512
CONTEXT = 64
RATE = 16_000


class BaselineService(pb_grpc.InferenceServiceServicer):
    def __init__(self) -> None:
        self._model = load_silero_vad()._model
        self._model.eval()
        self._ids = itertools.count(1)

    async def Stream(self, request_iterator, context):
        first = await anext(aiter(request_iterator))
        audio_format = first.config.audio_format
        if audio_format.sample_rate_hertz != RATE or audio_format.encoding != pb.AUDIO_ENCODING_LINEAR16:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"config.audio_format: this baseline takes LINEAR16 at {RATE} Hz, "
                f"got encoding {audio_format.encoding} at {audio_format.sample_rate_hertz} Hz",
            )

        yield pb.StreamResponse(
            session_accepted=pb.SessionAccepted(
                stream_id=f"baseline-{next(self._ids)}", limits=pb.StreamLimits(max_chunks_in_flight=64)
            )
        )

        state = torch.zeros(2, 1, 128)
        history = np.zeros(CONTEXT, dtype=np.float32)
        pending = np.zeros(0, dtype=np.float32)
        samples_done = 0
        speaking = False
        chunks = results_sent = 0
        async for request in request_iterator:
            if not request.HasField("audio"):
                continue
            number = request.audio.sequence_number
            chunks += 1
            samples = np.frombuffer(request.audio.audio_content, dtype="<i2").astype(np.float32) / 32768.0
            pending = np.concatenate([pending, samples])

            results = []
            with torch.inference_mode():
                while len(pending) >= WINDOW:
                    x = torch.from_numpy(np.concatenate([history, pending[:WINDOW]])[None, :])
                    probability, state = self._model(x, state)
                    history = pending[WINDOW - CONTEXT : WINDOW].copy()
                    pending = pending[WINDOW:]
                    samples_done += WINDOW
                    value = float(probability[0, 0])
                    # Speech starts at 0.5 and ends below 0.35, as with get_speech_timestamps' defaults.
                    if speaking != (value >= (0.35 if speaking else 0.5)):
                        speaking = not speaking
                        event = pb.SPEECH_EVENT_TYPE_SPEECH_START if speaking else pb.SPEECH_EVENT_TYPE_SPEECH_END
                        result = pb.StreamResult(
                            model="silero_vad",
                            modality=pb.MODALITY_AUDIO,
                            first_sequence_number=number,
                            last_sequence_number=number,
                            is_final=True,
                            speech=pb.SpeechSegment(event_type=event, speech_probability=value),
                        )
                        result.start_time.FromNanoseconds(int(samples_done / RATE * 1e9))
                        results.append(result)
            results_sent += len(results)
            yield pb.StreamResponse(
                results=results,
                acks=[pb.ChunkAck(modality=pb.MODALITY_AUDIO, first_sequence_number=number, last_sequence_number=number)],
            )

        yield pb.StreamResponse(
            stream_end=pb.StreamEnd(
                totals=[pb.ModalityTotals(modality=pb.MODALITY_AUDIO, chunks_received=chunks, chunks_acked=chunks)],
                results_sent=results_sent,
                reason=pb.STREAM_END_REASON_INPUT_ENDED,
            )
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1; 0 picks a free one (default: 0)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (default: 1, which streaminfer's model thread uses on two cores)",
    )
    options = parser.parse_args()
    torch.set_num_threads(options.torch_threads)
    uvloop.run(serve(BaselineService(), options.port, "one inference per chunk, no batching"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
