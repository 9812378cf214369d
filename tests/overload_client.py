"""A client process for the overload tests, so that a test can kill it or keep its memory out of the server's.

Usage:
    python overload_client.py hold TARGET WAV
        Open one silero_vad stream, send WAV in real time in a loop, and print
        "accepted STREAM_ID" once the server admits it. Runs until killed.
    python overload_client.py churn TARGET ROUNDS COUNT BATCH
        Run ROUNDS rounds. Each round opens COUNT streams, BATCH at a time, and
        cancels each one at a different point: before the first response,
        after SessionAccepted, or after the answer to one chunk. It then prints
        one JSON line of outcome counts and waits for a line on stdin before
        the next round.
    python overload_client.py burst TARGET COUNT
        Open COUNT streams at once, keep the admitted ones open until every
        stream has its first answer, check health meanwhile, then half-close
        the admitted ones and print one JSON line of outcome counts. It uses
        the blocking API: grpc.aio reports INTERNAL in place of the server's
        status when a send races the server ending the call (grpc/grpc#36066).
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import threading
import time
import wave

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

CHUNK_MS = 32
# Per stream of the churn: no single stream may hold the batch longer than this.
CHURN_STEP_TIMEOUT_S = 30.0


def vad_config(rate: int) -> pb.StreamConfig:
    return pb.StreamConfig(
        models=[pb.ModelSelection(model="silero_vad")],
        audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=rate),
    )


def hold(target: str, wav_path: str) -> None:
    with wave.open(wav_path) as file:
        rate = file.getframerate()
        pcm = file.readframes(file.getnframes())
    step = rate * CHUNK_MS // 1000 * 2

    def requests():
        yield pb.StreamRequest(config=vad_config(rate))
        sequence_number = 0
        while True:
            for offset in range(0, len(pcm) - step, step):
                yield pb.StreamRequest(
                    audio=pb.AudioChunk(sequence_number=sequence_number, audio_content=pcm[offset : offset + step])
                )
                sequence_number += 1
                time.sleep(CHUNK_MS / 1000)

    with grpc.insecure_channel(target) as channel:
        for response in pb_grpc.InferenceServiceStub(channel).Stream(requests(), timeout=600):
            if response.HasField("session_accepted"):
                print(f"accepted {response.session_accepted.stream_id}", flush=True)


async def churn(target: str, count: int, batch: int) -> dict[str, int]:
    outcomes: collections.Counter[str] = collections.Counter()
    silence = bytes(2 * 16_000 * CHUNK_MS // 1000)

    async def one(index: int, stub: pb_grpc.InferenceServiceStub) -> None:
        never = asyncio.Event()
        send_chunk = index % 3 == 2

        async def requests():
            yield pb.StreamRequest(config=vad_config(16_000))
            if send_chunk:
                yield pb.StreamRequest(audio=pb.AudioChunk(sequence_number=0, audio_content=silence))
            await never.wait()

        call = stub.Stream(requests(), timeout=60)
        try:
            if index % 3 == 0:
                outcomes["cancelled_at_once"] += 1
                return
            first = await asyncio.wait_for(call.read(), CHURN_STEP_TIMEOUT_S)
            if first is grpc.aio.EOF or not first.HasField("session_accepted"):
                outcomes["no_session_accepted"] += 1
                return
            if send_chunk:
                answer = await asyncio.wait_for(call.read(), CHURN_STEP_TIMEOUT_S)
                outcomes["answered" if answer is not grpc.aio.EOF and (answer.acks or answer.errors) else "unanswered"] += 1
            outcomes["accepted"] += 1
        except grpc.aio.AioRpcError as error:
            outcomes[f"status_{error.code().name}"] += 1
        except asyncio.TimeoutError:
            outcomes["timed_out"] += 1
        finally:
            call.cancel()

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for start in range(0, count, batch):
            await asyncio.gather(*(one(index, stub) for index in range(start, min(count, start + batch))))
    return dict(outcomes)


def burst(target: str, count: int) -> dict[str, int]:
    """Open ``count`` streams at once with the blocking API, which reports the server's status of every call."""
    outcomes: collections.Counter[str] = collections.Counter()
    release = threading.Event()
    everyone_answered = threading.Event()

    def requests():
        yield pb.StreamRequest(config=vad_config(16_000))
        release.wait(timeout=CHURN_STEP_TIMEOUT_S * 4)

    checked = threading.Event()

    def check_health(channel: grpc.Channel) -> None:
        checker = health_pb2_grpc.HealthStub(channel)
        while not everyone_answered.is_set():
            try:
                response = checker.Check(health_pb2.HealthCheckRequest(), timeout=10)
            except grpc.RpcError as error:
                outcomes[f"health_{error.code().name.lower()}"] += 1
            else:
                outcomes[f"health_{health_pb2.HealthCheckResponse.ServingStatus.Name(response.status).lower()}"] += 1
                outcomes["health_during_burst"] += not everyone_answered.is_set()
            checked.set()
            time.sleep(0.02)

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        checker = threading.Thread(target=check_health, args=(channel,))
        checker.start()
        calls = [stub.Stream(requests(), timeout=CHURN_STEP_TIMEOUT_S * 4) for _ in range(count)]
        admitted = []
        for call in calls:
            try:
                first = next(call)
            except grpc.RpcError as error:
                code = error.code().name.lower()
                outcomes[code] += 1
                if "grpc-retry-pushback-ms" in dict(error.trailing_metadata() or ()):
                    outcomes[f"{code}_with_pushback"] += 1
                elif code != "unavailable":
                    # Named in full, so that a failed test shows what the call ended with.
                    outcomes[f"{code}: {error.details()}"] += 1
            else:
                outcomes["accepted" if first.HasField("session_accepted") else "no_session_accepted"] += 1
                admitted.append(call)
        # The admitted streams stay open until release. On a machine busy
        # enough that every stream was answered before the first check came
        # back, that check still runs while they are open.
        checked.wait(timeout=CHURN_STEP_TIMEOUT_S)
        everyone_answered.set()
        checker.join()
        release.set()
        for call in admitted:
            try:
                for _ in call:
                    pass
            except grpc.RpcError as error:
                outcomes[f"ended_{error.code().name.lower()}"] += 1
            else:
                outcomes["ended_ok"] += 1
    return dict(outcomes)


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "hold":
        hold(argv[2], argv[3])
        return 0
    if len(argv) == 6 and argv[1] == "churn":
        target, rounds, count, batch = argv[2], int(argv[3]), int(argv[4]), int(argv[5])
        for round_index in range(rounds):
            if round_index:
                sys.stdin.readline()
            started = time.monotonic()
            outcomes = asyncio.run(churn(target, count, batch))
            outcomes["elapsed_ms"] = round((time.monotonic() - started) * 1000)
            print(json.dumps(outcomes), flush=True)
        return 0
    if len(argv) == 4 and argv[1] == "burst":
        print(json.dumps(burst(argv[2], int(argv[3]))), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
