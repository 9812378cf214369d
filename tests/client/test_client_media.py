"""Media readers: WAV chunking, video frames, text chunks, and pacing."""

from __future__ import annotations

import asyncio
import pathlib
import sys
import time

import pytest
from client_fakes import FakeClock, write_wav

from streaminfer.client import (
    AudioFormat,
    MediaChunk,
    Pacer,
    iter_text_chunks,
    iter_video_frames,
    iter_wav_chunks,
    paced,
    paced_async,
    read_wav_format,
    video_frame_rate,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
MEDIA = REPO_ROOT / "media"


@pytest.mark.parametrize(
    ("rate", "channels", "frames_per_chunk"),
    [(16000, 1, 512), (48000, 1, 1536), (48000, 2, 1536), (8000, 1, 256)],
)
def test_wav_chunks_32ms_sizes(tmp_path: pathlib.Path, rate: int, channels: int, frames_per_chunk: int) -> None:
    path = tmp_path / "tone.wav"
    total_frames = frames_per_chunk * 10 + 100
    write_wav(path, rate=rate, channels=channels, frames=total_frames)

    chunks = list(iter_wav_chunks(path, chunk_ms=32))

    assert len(chunks) == 11
    full_bytes = frames_per_chunk * channels * 2
    assert [len(chunk.content) for chunk in chunks[:-1]] == [full_bytes] * 10
    assert len(chunks[-1].content) == 100 * channels * 2
    assert sum(len(chunk.content) for chunk in chunks) == total_frames * channels * 2
    for index, chunk in enumerate(chunks):
        assert chunk.timestamp_s == pytest.approx(index * 0.032)
    assert chunks[0].duration_s == pytest.approx(0.032)
    assert chunks[-1].duration_s == pytest.approx(100 / rate)


def test_wav_chunks_keep_sample_order(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ramp.wav"
    write_wav(path, rate=16000, channels=1, frames=2000)
    with open(path, "rb") as file:
        data = file.read()

    joined = b"".join(chunk.content for chunk in iter_wav_chunks(path, chunk_ms=32))

    assert data.endswith(joined)


def test_wav_chunks_odd_rate_no_drift(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "cd.wav"
    write_wav(path, rate=44100, channels=2, frames=44100)

    chunks = list(iter_wav_chunks(path, chunk_ms=32))

    # 32 ms at 44.1 kHz is 1411.2 frames; chunks hold 1411 and timestamps count frames.
    assert len(chunks[0].content) == 1411 * 2 * 2
    assert chunks[10].timestamp_s == pytest.approx(10 * 1411 / 44100)
    assert chunks[-1].timestamp_s + chunks[-1].duration_s == pytest.approx(1.0)


def test_wav_media_file_chunks() -> None:
    path = MEDIA / "audio" / "Front_Center.wav"
    if not path.exists():
        pytest.skip(f"{path} is missing")

    audio_format = read_wav_format(path)
    chunks = list(iter_wav_chunks(path, chunk_ms=32))

    assert audio_format == AudioFormat(sample_rate_hertz=48000, channel_count=1)
    assert all(len(chunk.content) == 3072 for chunk in chunks[:-1])
    assert sum(len(chunk.content) for chunk in chunks) == 68545 * 2


def test_wav_rejects_8bit(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "eight.wav"
    write_wav(path, rate=8000, channels=1, frames=100, sample_width=1)

    with pytest.raises(ValueError, match="8-bit samples are not supported"):
        read_wav_format(path)
    with pytest.raises(ValueError, match="expected 16-bit PCM"):
        list(iter_wav_chunks(path))


def test_wav_rejects_bad_chunk_ms(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "tone.wav"
    write_wav(path, rate=16000, channels=1, frames=100)

    with pytest.raises(ValueError, match="chunk_ms = 0"):
        list(iter_wav_chunks(path, chunk_ms=0))


def test_wav_chunks_max_seconds_trims_last(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "tone.wav"
    write_wav(path, rate=16000, channels=2, frames=16000)

    chunks = list(iter_wav_chunks(path, chunk_ms=32, max_seconds=0.5))

    # 0.5 s is 8000 frames: 15 chunks of 512 frames and one of 320.
    assert len(chunks) == 16
    assert len(chunks[-1].content) == 320 * 2 * 2
    assert sum(len(chunk.content) for chunk in chunks) == 8000 * 2 * 2
    assert chunks[-1].timestamp_s + chunks[-1].duration_s == pytest.approx(0.5)


def test_wav_chunks_max_seconds_past_end(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "tone.wav"
    write_wav(path, rate=16000, channels=1, frames=1000)

    chunks = list(iter_wav_chunks(path, chunk_ms=32, max_seconds=60))

    assert sum(len(chunk.content) for chunk in chunks) == 1000 * 2


@pytest.mark.parametrize("max_seconds", [0, -1.0, float("inf")])
def test_readers_reject_bad_max_seconds(tmp_path: pathlib.Path, max_seconds: float) -> None:
    path = tmp_path / "tone.wav"
    write_wav(path, rate=16000, channels=1, frames=100)

    with pytest.raises(ValueError, match=f"max_seconds = {max_seconds!r} is invalid"):
        list(iter_wav_chunks(path, max_seconds=max_seconds))
    with pytest.raises(ValueError, match=f"max_seconds = {max_seconds!r} is invalid"):
        list(iter_text_chunks("one two\n", max_seconds=max_seconds))


def _write_video(path: pathlib.Path, frames: int, fps: float) -> None:
    cv2 = pytest.importorskip("cv2")
    np = pytest.importorskip("numpy")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    assert writer.isOpened(), "OpenCV cannot write MJPG AVI files here"
    for index in range(frames):
        writer.write(np.full((48, 64, 3), index * 10 % 256, dtype=np.uint8))
    writer.release()


def test_video_frames_native_rate(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "clip.avi"
    _write_video(path, frames=10, fps=10.0)

    frames = list(iter_video_frames(path))

    assert video_frame_rate(path) == pytest.approx(10.0)
    assert len(frames) == 10
    assert [frame.timestamp_s for frame in frames] == pytest.approx([index / 10 for index in range(10)])
    assert all(frame.content[:2] == b"\xff\xd8" for frame in frames), "frames are not JPEG"


def test_video_frames_lower_fps(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "clip.avi"
    _write_video(path, frames=20, fps=10.0)

    frames = list(iter_video_frames(path, fps=5.0))

    assert [frame.timestamp_s for frame in frames] == pytest.approx([index / 5 for index in range(10)])


def test_video_frames_higher_fps_no_repeats(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "clip.avi"
    _write_video(path, frames=10, fps=10.0)

    frames = list(iter_video_frames(path, fps=30.0))

    assert len(frames) == 10


def test_video_frames_max_seconds(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "clip.avi"
    _write_video(path, frames=20, fps=10.0)

    frames = list(iter_video_frames(path, max_seconds=1.05))
    halved = list(iter_video_frames(path, fps=5.0, max_seconds=1.0))

    assert [frame.timestamp_s for frame in frames] == pytest.approx([index / 10 for index in range(11)])
    assert [frame.timestamp_s for frame in halved] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])


def test_video_rejects_bad_max_seconds(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "clip.avi"
    _write_video(path, frames=2, fps=10.0)

    with pytest.raises(ValueError, match="max_seconds = 0 is invalid"):
        list(iter_video_frames(path, max_seconds=0))


def test_video_missing_file(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("cv2")

    with pytest.raises(ValueError, match="cannot open the video file"):
        list(iter_video_frames(tmp_path / "absent.avi"))


def test_video_without_opencv(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    # A None entry makes `import cv2` raise ImportError, as if it were not installed.
    monkeypatch.setitem(sys.modules, "cv2", None)

    with pytest.raises(ImportError, match=r"streaminfer-client\[video\]"):
        list(iter_video_frames(tmp_path / "clip.avi"))


def test_text_chunks_lines_and_times() -> None:
    text = "one two three\n\nfour five\nsix\n\n"

    chunks = list(iter_text_chunks(text, words_per_minute=60))

    assert [chunk.content for chunk in chunks] == [b"one two three\n", b"\nfour five\n", b"six\n"]
    assert [chunk.timestamp_s for chunk in chunks] == [0.0, 3.0, 5.0]
    assert [chunk.duration_s for chunk in chunks] == [3.0, 2.0, 1.0]


def test_text_chunks_max_seconds_by_pace() -> None:
    text = "one two three\n\nfour five\nsix\n\n"

    chunks = list(iter_text_chunks(text, words_per_minute=60, max_seconds=5.0))

    # "six" would be spoken at 5 s, so it is left out; "four five" starts at 3 s and runs past 5 s.
    assert [chunk.content for chunk in chunks] == [b"one two three\n", b"\nfour five\n"]


def test_text_chunks_split_long_line_utf8() -> None:
    text = "é" * 10 + "\n"

    chunks = list(iter_text_chunks(text, max_chunk_bytes=7))

    assert all(len(chunk.content) <= 7 for chunk in chunks)
    assert b"".join(chunk.content for chunk in chunks).decode("utf-8") == text


@pytest.mark.parametrize("read_in_thread", [False, True])
def test_paced_async_yields_all(read_in_thread: bool) -> None:
    chunks = [MediaChunk(bytes([index]), timestamp_s=index * 0.01, duration_s=0.01) for index in range(5)]

    async def collect() -> list[MediaChunk]:
        return [chunk async for chunk in paced_async(chunks, speed=0, read_in_thread=read_in_thread)]

    assert asyncio.run(collect()) == chunks


def test_paced_sync_real_time() -> None:
    chunks = [MediaChunk(b"", timestamp_s=index * 0.05, duration_s=0.05) for index in range(3)]
    start = time.monotonic()

    assert list(paced(chunks, speed=1.0)) == chunks
    assert time.monotonic() - start >= 0.09


def test_pacer_real_time_and_speed() -> None:
    clock = FakeClock()
    pacer = Pacer(speed=2.0, clock=clock)

    assert pacer.delay_s(5.0) == 0.0
    assert pacer.delay_s(6.0) == pytest.approx(0.5)
    clock.advance(0.5)
    assert pacer.delay_s(6.0) == pytest.approx(0.0)
    # A late sender is not pushed back: the schedule stays anchored.
    clock.advance(10.0)
    assert pacer.delay_s(7.0) == 0.0
    assert pacer.delay_s(40.0) == pytest.approx(7.0)


def test_pacer_anchor_schedule() -> None:
    clock = FakeClock()
    pacer = Pacer(speed=1.0, clock=clock)

    pacer.delay_s(0.0)
    clock.advance(3.0)

    assert pacer.delay_s(2.0) == 0.0
    assert pacer.delay_s(4.0) == pytest.approx(1.0)


def test_pacer_speed_zero_never_waits() -> None:
    clock = FakeClock()
    pacer = Pacer(speed=0, clock=clock)

    assert [pacer.delay_s(t) for t in (0.0, 100.0, 1000.0)] == [0.0, 0.0, 0.0]


def test_pacer_rejects_negative_speed() -> None:
    with pytest.raises(ValueError, match="speed = -1"):
        Pacer(speed=-1)
