"""A bare grpc.aio server that acknowledges every audio chunk at once with a ChunkAck.

It speaks the streaminfer protocol with no decoding, batching or model, so the
benchmark can measure what gRPC itself costs on this machine at the same
message sizes: the ceiling any Python gRPC server reaches here. With
``--results`` each ack comes with the result that streaminfer's no-op audio
model sends for the chunk, so both servers send the same content per chunk.
"""

from __future__ import annotations

import argparse
import sys

import grpc
import uvloop

from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc


class EchoService(pb_grpc.InferenceServiceServicer):
    def __init__(self, results: bool = False) -> None:
        self._results = results

    async def Stream(self, request_iterator, context):
        first = await anext(aiter(request_iterator))
        assert first.HasField("config")
        rate = first.config.audio_format.sample_rate_hertz or 16_000
        yield pb.StreamResponse(session_accepted=pb.SessionAccepted(stream_id="echo"))
        samples = 0
        async for request in request_iterator:
            if request.HasField("audio"):
                number = request.audio.sequence_number
                response = pb.StreamResponse(
                    acks=[pb.ChunkAck(modality=pb.MODALITY_AUDIO, first_sequence_number=number, last_sequence_number=number)]
                )
                if self._results:
                    # As the no-op model's result: the chunk's numbers and its start in the stream's audio.
                    result = response.results.add(
                        model="noop_audio",
                        modality=pb.MODALITY_AUDIO,
                        first_sequence_number=number,
                        last_sequence_number=number,
                        is_final=True,
                    )
                    result.start_time.FromNanoseconds(samples * 1_000_000_000 // rate)
                    samples += len(request.audio.audio_content) // 2
                yield response


async def serve(service: pb_grpc.InferenceServiceServicer, port: int, description: str) -> None:
    """Serve ``service`` on 127.0.0.1:``port`` and print the ready line the benchmarks wait for."""
    server = grpc.aio.server()
    pb_grpc.add_InferenceServiceServicer_to_server(service, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"streaminfer listening on 127.0.0.1:{bound} ({description})", flush=True)
    await server.wait_for_termination()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1; 0 picks a free one (default: 0)")
    parser.add_argument(
        "--results",
        action="store_true",
        help="send with each ack the result the no-op audio model sends (16-bit mono audio assumed)",
    )
    options = parser.parse_args()
    uvloop.run(serve(EchoService(options.results), options.port, "echo baseline"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
