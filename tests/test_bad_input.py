"""Bad input gets a clear status or chunk error, and a healthy stream beside it is unaffected."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from conftest import MEDIA
from streamutil import audio_requests, jpeg, read_wav, run_stream, vad_config
from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc


def stream_status(channel, messages: list[pb.StreamRequest]) -> grpc.RpcError:
    stub = pb_grpc.InferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Stream(iter(messages), timeout=30))
    return caught.value


class HealthyNeighbour:
    """A VAD stream running in a thread while a test sends bad input."""

    def __init__(self, channel) -> None:
        samples, rate = read_wav(MEDIA / "audio" / "speech_sample.wav")
        self._requests = audio_requests(samples, rate)
        self._channel = channel
        self.outcome = None
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        samples, rate = read_wav(MEDIA / "audio" / "speech_sample.wav")
        self.outcome = run_stream(self._channel, vad_config(rate), self._requests)

    def __enter__(self) -> HealthyNeighbour:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._thread.join(timeout=120)
        assert self.outcome is not None, "the healthy stream did not finish"
        assert self.outcome.errors == []
        assert self.outcome.answered(pb.MODALITY_AUDIO) == list(range(len(self._requests)))
        # Four recordings of two words each.
        assert len(self.outcome.speech_segments()) == 8


def test_no_config_first(channel) -> None:
    with HealthyNeighbour(channel):
        error = stream_status(channel, [pb.StreamRequest(audio=pb.AudioChunk(audio_content=b"\0\0"))])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first StreamRequest must carry config" in error.details()


def test_unknown_model(channel) -> None:
    config = pb.StreamConfig(models=[pb.ModelSelection(model="whisper_xxl")])
    with HealthyNeighbour(channel):
        error = stream_status(channel, [pb.StreamRequest(config=config)])
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "'whisper_xxl'" in error.details()
    assert "silero_vad" in error.details()


def test_sample_rate_zero(channel) -> None:
    config = vad_config(sample_rate=0)
    with HealthyNeighbour(channel):
        error = stream_status(channel, [pb.StreamRequest(config=config)])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sample_rate_hertz = 0" in error.details()


@pytest.mark.parametrize("field", ["audio_format", "video_format"])
def test_undefined_encoding(channel, field: str) -> None:
    config = vad_config() if field == "audio_format" else video_config()
    # 99 is no value of AudioEncoding or ImageEncoding; an older client could send one a newer server dropped.
    getattr(config, field).encoding = 99
    with HealthyNeighbour(channel):
        error = stream_status(channel, [pb.StreamRequest(config=config)])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"config.{field}.encoding = 99 is not" in error.details()


def test_decoding_bug_fails_only_its_chunk(channel, monkeypatch: pytest.MonkeyPatch) -> None:
    from streaminfer.server import session as session_module

    decode_audio = session_module.decode_audio

    def decode_with_bug(content: bytes, encoding: int, channels: int) -> np.ndarray:
        if content.startswith(b"BUG!"):
            raise KeyError("a bug in decoding")
        return decode_audio(content, encoding, channels)

    monkeypatch.setattr(session_module, "decode_audio", decode_with_bug)
    requests = [
        pb.StreamRequest(audio=pb.AudioChunk(sequence_number=number, audio_content=content))
        for number, content in enumerate([b"\0\0" * 512, b"BUG!" * 256, b"\0\0" * 512])
    ]
    outcome = run_stream(channel, vad_config(), requests)
    # The chunk that hit the bug is failed, not covered by the ack of the chunk after it.
    assert outcome.acked[pb.MODALITY_AUDIO] == [0, 2]
    assert [(error.sequence_number, error.reason) for error in outcome.errors] == [
        (1, pb.CHUNK_ERROR_REASON_DECODE_FAILED)
    ]
    assert "the server failed to decode audio chunk 1 (KeyError" in outcome.errors[0].message


def test_odd_byte_count_pcm16(channel) -> None:
    good = np.zeros(1536, dtype="<i2").tobytes()
    requests = [
        pb.StreamRequest(audio=pb.AudioChunk(sequence_number=0, audio_content=good)),
        pb.StreamRequest(audio=pb.AudioChunk(sequence_number=1, audio_content=good[:-1])),
        pb.StreamRequest(audio=pb.AudioChunk(sequence_number=2, audio_content=good)),
    ]
    with HealthyNeighbour(channel):
        outcome = run_stream(channel, vad_config(48_000), requests)
    assert [error.sequence_number for error in outcome.errors] == [1]
    error = outcome.errors[0]
    assert error.reason == pb.CHUNK_ERROR_REASON_INVALID_ARGUMENT
    assert "audio.audio_content has 3071 bytes" in error.message
    assert outcome.acked[pb.MODALITY_AUDIO] == [0, 2]


def video_config() -> pb.StreamConfig:
    return pb.StreamConfig(
        models=[pb.ModelSelection(model="hog_people")], video_format=pb.VideoFormat(encoding=pb.IMAGE_ENCODING_JPEG)
    )


def test_corrupt_jpeg(channel) -> None:
    image = np.full((120, 160, 3), 90, dtype=np.uint8)
    valid = jpeg(image)
    requests = [
        pb.StreamRequest(frame=pb.VideoFrame(sequence_number=0, image_content=valid[: len(valid) // 3])),
        pb.StreamRequest(frame=pb.VideoFrame(sequence_number=1, image_content=b"not a jpeg at all")),
        pb.StreamRequest(frame=pb.VideoFrame(sequence_number=2, image_content=valid)),
    ]
    with HealthyNeighbour(channel):
        outcome = run_stream(channel, video_config(), requests)
    failed = {error.sequence_number: error for error in outcome.errors}
    assert 1 in failed
    assert failed[1].reason == pb.CHUNK_ERROR_REASON_DECODE_FAILED
    assert "frame.image_content" in failed[1].message
    assert outcome.answered(pb.MODALITY_VIDEO) == [0, 1, 2]
    assert 2 in outcome.acked[pb.MODALITY_VIDEO]


def test_frame_larger_than_limit(channel, server) -> None:
    limit = server.config.limits.max_frame_dimension
    image = np.zeros((16, limit + 16, 3), dtype=np.uint8)
    requests = [pb.StreamRequest(frame=pb.VideoFrame(sequence_number=0, image_content=jpeg(image)))]
    with HealthyNeighbour(channel):
        outcome = run_stream(channel, video_config(), requests)
    assert len(outcome.errors) == 1
    assert outcome.errors[0].reason == pb.CHUNK_ERROR_REASON_TOO_LARGE
    assert f"{limit + 16} x 16 pixels" in outcome.errors[0].message


def test_frame_bytes_over_limit(channel, server) -> None:
    too_many = server.config.limits.max_frame_bytes + 1
    requests = [pb.StreamRequest(frame=pb.VideoFrame(sequence_number=0, image_content=b"\xff" * too_many))]
    outcome = run_stream(channel, video_config(), requests)
    assert [error.reason for error in outcome.errors] == [pb.CHUNK_ERROR_REASON_TOO_LARGE]
    assert str(too_many) in outcome.errors[0].message
    assert "lower resolution or JPEG quality" in outcome.errors[0].message


def test_text_not_utf8(channel) -> None:
    config = pb.StreamConfig(models=[pb.ModelSelection(model="minilm_embedding")])
    requests = [
        pb.StreamRequest(text=pb.TextChunk(sequence_number=0, text=b"Valid text. ")),
        pb.StreamRequest(text=pb.TextChunk(sequence_number=1, text=b"caf\xc3")),  # split character: valid
        pb.StreamRequest(text=pb.TextChunk(sequence_number=2, text=b"\xa9 is open. ")),
        pb.StreamRequest(text=pb.TextChunk(sequence_number=3, text=b"bad \xff\xfe bytes. ")),
    ]
    with HealthyNeighbour(channel):
        outcome = run_stream(channel, config, requests)
    assert [error.sequence_number for error in outcome.errors] == [3]
    assert outcome.errors[0].reason == pb.CHUNK_ERROR_REASON_DECODE_FAILED
    assert "not valid UTF-8" in outcome.errors[0].message
    texts = [result.embedding.text for result in outcome.results]
    assert texts == ["Valid text.", "café is open."]
    assert outcome.answered(pb.MODALITY_TEXT) == [0, 1, 2, 3]


def test_sequence_numbers_must_increase(channel) -> None:
    chunk = np.zeros(1536, dtype="<i2").tobytes()
    requests = [
        pb.StreamRequest(audio=pb.AudioChunk(sequence_number=5, audio_content=chunk)),
        pb.StreamRequest(audio=pb.AudioChunk(sequence_number=5, audio_content=chunk)),
        pb.StreamRequest(audio=pb.AudioChunk(sequence_number=6, audio_content=chunk)),
    ]
    outcome = run_stream(channel, vad_config(48_000), requests)
    assert len(outcome.errors) == 1
    assert "sequence_number = 5 is not greater than the previous 5" in outcome.errors[0].message
    assert outcome.acked[pb.MODALITY_AUDIO] == [5, 6]


def test_extreme_sequence_numbers(channel) -> None:
    chunk = np.zeros(1536, dtype="<i2").tobytes()
    lowest, highest = -(1 << 63), (1 << 63) - 1
    sent = [lowest, 0, highest]
    messages = [pb.StreamRequest(config=vad_config(48_000))] + [
        pb.StreamRequest(audio=pb.AudioChunk(sequence_number=number, audio_content=chunk)) for number in sent
    ]

    # Ack ranges are kept as ranges: expanding [lowest, highest] would not fit in memory.
    responses = list(pb_grpc.InferenceServiceStub(channel).Stream(iter(messages), timeout=60))

    ranges = [(ack.first_sequence_number, ack.last_sequence_number) for r in responses for ack in r.acks]
    errors = [error for r in responses for error in r.errors]
    assert errors == []
    for number in sent:
        assert sum(first <= number <= last for first, last in ranges) == 1, f"{number} acked {ranges}"
    assert responses[-1].stream_end.totals[0].chunks_acked == 3
