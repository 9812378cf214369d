"""Helpers for tests that drive the Stream RPC with the generated stubs."""

from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess
import sys
import wave
from collections.abc import Iterable, Iterator

import cv2
import grpc
import numpy as np

from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc


@dataclasses.dataclass
class StreamOutcome:
    responses: list[pb.StreamResponse]
    results: list[pb.StreamResult]
    acked: dict[int, list[int]]  # modality -> acknowledged sequence numbers, in order
    errors: list[pb.ChunkError]
    end: pb.StreamEnd | None

    def answered(self, modality: int) -> list[int]:
        """Every sequence number of ``modality`` that got an ack or an error."""
        errored = [error.sequence_number for error in self.errors if error.modality == modality]
        return sorted(self.acked.get(modality, []) + errored)

    def speech_segments(self) -> list[tuple[float, float]]:
        return [
            (duration_seconds(result.start_time), duration_seconds(result.end_time))
            for result in self.results
            if result.WhichOneof("payload") == "speech" and result.speech.event_type == pb.SPEECH_EVENT_TYPE_SPEECH_END
        ]


def duration_seconds(duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def collect(responses: Iterable[pb.StreamResponse]) -> StreamOutcome:
    outcome = StreamOutcome([], [], {}, [], None)
    for response in responses:
        outcome.responses.append(response)
        outcome.results.extend(response.results)
        for ack in response.acks:
            outcome.acked.setdefault(ack.modality, []).extend(
                range(ack.first_sequence_number, ack.last_sequence_number + 1)
            )
        outcome.errors.extend(response.errors)
        if response.HasField("stream_end"):
            outcome.end = response.stream_end
    return outcome


def run_stream(
    channel: grpc.Channel,
    config: pb.StreamConfig,
    requests: Iterable[pb.StreamRequest],
    metadata: tuple[tuple[str, str], ...] = (),
) -> StreamOutcome:
    """Send ``config`` then ``requests``, half-close, and collect every response."""

    def messages() -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(config=config)
        yield from requests

    stub = pb_grpc.InferenceServiceStub(channel)
    return collect(stub.Stream(messages(), timeout=120, metadata=metadata))


def vad_config(sample_rate: int = 48_000, interim: bool = False) -> pb.StreamConfig:
    return pb.StreamConfig(
        models=[pb.ModelSelection(model="silero_vad")],
        audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=sample_rate),
        interim_results=interim,
    )


def read_wav(path: pathlib.Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as file:
        assert file.getsampwidth() == 2
        assert file.getnchannels() == 1
        return np.frombuffer(file.readframes(file.getnframes()), dtype="<i2"), file.getframerate()


def audio_requests(samples: np.ndarray, rate: int, chunk_ms: int = 32) -> list[pb.StreamRequest]:
    step = rate * chunk_ms // 1000
    return [
        pb.StreamRequest(audio=pb.AudioChunk(sequence_number=i, audio_content=samples[offset : offset + step].tobytes()))
        for i, offset in enumerate(range(0, len(samples), step))
    ]


def video_frames(path: pathlib.Path, indices: Iterable[int]) -> list[np.ndarray]:
    remaining = set(indices)
    capture = cv2.VideoCapture(str(path))
    frames = []
    index = 0
    try:
        while remaining:
            ok, frame = capture.read()
            if not ok:
                break
            if index in remaining:
                frames.append(frame)
                remaining.discard(index)
            index += 1
    finally:
        capture.release()
    return frames


def jpeg(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".jpg", image)
    assert ok
    return encoded.tobytes()


def start_cli_server(args: list[str]) -> tuple[subprocess.Popen[str], int, list[str]]:
    """Start `streaminfer serve --port 0 ARGS`; return the process, its port and the log up to its ready line.

    The caller stops the process. Its output goes on in process.stdout.
    """
    server = subprocess.Popen(
        [sys.executable, "-m", "streaminfer.server.cli", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert server.stdout is not None
    log = []
    for line in server.stdout:
        log.append(line)
        if line.startswith("streaminfer listening on"):
            break
    match = re.search(r"listening on \S+:(\d+)", log[-1]) if log else None
    if match is None:
        server.kill()
        raise AssertionError("the server exited before listening:\n" + "".join(log))
    return server, int(match.group(1)), log
