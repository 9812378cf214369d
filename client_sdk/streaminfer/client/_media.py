"""Readers that cut media files into timestamped chunks ready to send."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import wave
from collections.abc import Iterator

from streaminfer.client._config import AudioFormat

__all__ = [
    "MediaChunk",
    "iter_text_chunks",
    "iter_video_frames",
    "iter_wav_chunks",
    "read_wav_format",
    "video_frame_rate",
]

# A common speaking rate; a transcript arrives about this fast in real time.
DEFAULT_WORDS_PER_MINUTE = 150.0


@dataclasses.dataclass(frozen=True, slots=True)
class MediaChunk:
    """One chunk of media: its bytes and where it sits in media time."""

    content: bytes
    # Media time of the chunk's start and its length, in seconds.
    timestamp_s: float
    duration_s: float


def read_wav_format(path: str | os.PathLike[str]) -> AudioFormat:
    """Return the audio format of a 16-bit PCM WAV file; raises ValueError for other sample sizes."""
    with _open_wav(path) as reader:
        return _wav_format(reader, path)


def _open_wav(path: str | os.PathLike[str]) -> wave.Wave_read:
    """Open a WAV file, turning the wave module's terse errors into ones that state what to do."""
    try:
        return wave.open(os.fspath(path), "rb")
    except wave.Error as error:
        if "unknown format: 3" in str(error):
            detail = "32-bit float samples are not supported by the WAV reader"
        else:
            detail = f"not a PCM WAV file ({error})"
        raise ValueError(
            f"{os.fspath(path)}: {detail}: expected 16-bit PCM; "
            "convert the file, for example with `sox IN -b 16 -e signed-integer OUT.wav`"
        ) from error


def _wav_format(reader: wave.Wave_read, path: str | os.PathLike[str]) -> AudioFormat:
    sample_width = reader.getsampwidth()
    if sample_width != 2:
        raise ValueError(
            f"{os.fspath(path)}: {8 * sample_width}-bit samples are not supported: "
            "expected 16-bit PCM; convert the file, for example with `sox IN -b 16 OUT.wav`"
        )
    return AudioFormat(sample_rate_hertz=reader.getframerate(), channel_count=reader.getnchannels())


def iter_wav_chunks(
    path: str | os.PathLike[str], chunk_ms: float = 32.0, *, max_seconds: float | None = None
) -> Iterator[MediaChunk]:
    """Yield a 16-bit PCM WAV file in chunks of ``chunk_ms`` milliseconds.

    Chunks contain whole sample frames (one sample of every channel), so a
    chunk lasts the whole number of frames nearest to ``chunk_ms``. The last
    chunk may be shorter. Timestamps count frames, so they do not drift.
    ``max_seconds`` stops after that much audio, rounded to a whole frame.
    """
    if not chunk_ms > 0:
        raise ValueError(f"chunk_ms = {chunk_ms!r} is invalid: expected milliseconds > 0")
    _check_max_seconds(max_seconds)

    with _open_wav(path) as reader:
        audio_format = _wav_format(reader, path)
        rate = audio_format.sample_rate_hertz
        frames_per_chunk = max(1, round(rate * chunk_ms / 1000))
        frame_limit = math.inf if max_seconds is None else round(max_seconds * rate)
        frames_read = 0
        while frames_read < frame_limit:
            content = reader.readframes(int(min(frames_per_chunk, frame_limit - frames_read)))
            if not content:
                return
            frame_count = len(content) // (2 * audio_format.channel_count)
            yield MediaChunk(content, timestamp_s=frames_read / rate, duration_s=frame_count / rate)
            frames_read += frame_count


def video_frame_rate(path: str | os.PathLike[str]) -> float:
    """Return the frame rate a video file declares, or 0.0 when it declares none."""
    cv2 = _import_cv2()
    capture = cv2.VideoCapture(os.fspath(path))
    try:
        if not capture.isOpened():
            raise ValueError(f"{os.fspath(path)}: cannot open the video file (missing, or a codec OpenCV lacks)")
        rate = float(capture.get(cv2.CAP_PROP_FPS))
    finally:
        capture.release()
    return rate if math.isfinite(rate) and rate > 0 else 0.0


def iter_video_frames(
    path: str | os.PathLike[str],
    fps: float | None = None,
    *,
    jpeg_quality: int = 90,
    max_seconds: float | None = None,
) -> Iterator[MediaChunk]:
    """Yield a video file's frames, JPEG-encoded, with their media times.

    ``fps`` None keeps every frame at the file's rate. A lower ``fps`` skips
    frames to keep about that rate; a higher one yields every frame, because
    frames are never repeated. ``max_seconds`` stops before the first frame
    whose media time is that or later. Needs OpenCV:
    ``pip install 'streaminfer-client[video]'``.
    """
    cv2 = _import_cv2()
    if fps is not None and not fps > 0:
        raise ValueError(f"fps = {fps!r} is invalid: expected frames per second > 0, or None for the file's rate")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality = {jpeg_quality!r} is invalid: expected 1 to 100")
    _check_max_seconds(max_seconds)

    capture = cv2.VideoCapture(os.fspath(path))
    try:
        if not capture.isOpened():
            raise ValueError(f"{os.fspath(path)}: cannot open the video file (missing, or a codec OpenCV lacks)")
        native_fps = float(capture.get(cv2.CAP_PROP_FPS))
        if not (math.isfinite(native_fps) and native_fps > 0):
            if fps is None:
                raise ValueError(f"{os.fspath(path)}: the file declares no frame rate; pass fps")
            native_fps = fps
        interval = 1.0 / (fps if fps is not None else native_fps)
        duration = max(interval, 1.0 / native_fps)

        index = 0
        next_time = 0.0
        while True:
            media_time = index / native_fps
            if max_seconds is not None and media_time >= max_seconds:
                return
            ok, image = capture.read()
            if not ok:
                return
            index += 1
            # Half a source frame of tolerance keeps float error from skipping frames.
            if media_time + 0.5 / native_fps < next_time:
                continue
            next_time += interval
            encoded_ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
            if not encoded_ok:
                raise ValueError(f"{os.fspath(path)}: OpenCV failed to JPEG-encode frame {index - 1}")
            yield MediaChunk(encoded.tobytes(), timestamp_s=media_time, duration_s=duration)
    finally:
        capture.release()


def _check_max_seconds(max_seconds: float | None) -> None:
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
        raise ValueError(f"max_seconds = {max_seconds!r} is invalid: expected seconds > 0, or None for no limit")


def _import_cv2():  # type: ignore[no-untyped-def]
    try:
        import cv2
    except ImportError as error:
        raise ImportError(
            "reading video files needs OpenCV, which is not installed: "
            "run `pip install 'streaminfer-client[video]'`"
        ) from error
    return cv2


_WORD = re.compile(r"\S+")


def iter_text_chunks(
    text: str,
    *,
    words_per_minute: float = DEFAULT_WORDS_PER_MINUTE,
    max_chunk_bytes: int = 16384,
    max_seconds: float | None = None,
) -> Iterator[MediaChunk]:
    """Yield ``text`` line by line, timed as if spoken at ``words_per_minute``.

    Each chunk is one line with its newline; blank lines join the next line,
    and blank lines at the end are dropped.
    A line longer than ``max_chunk_bytes`` of UTF-8 is split between
    characters. A chunk's timestamp is the time its first word would be spoken.
    ``max_seconds`` stops before the first chunk timestamped that or later,
    so the last chunk sent may run past it.
    """
    if not words_per_minute > 0:
        raise ValueError(f"words_per_minute = {words_per_minute!r} is invalid: expected words per minute > 0")
    if max_chunk_bytes < 4:
        raise ValueError(f"max_chunk_bytes = {max_chunk_bytes!r} is invalid: expected 4 or more")
    _check_max_seconds(max_seconds)

    seconds_per_word = 60.0 / words_per_minute
    words_before = 0
    pending = ""
    for line in text.splitlines(keepends=True):
        pending += line
        if not line.strip():
            continue
        for piece in _split_utf8(pending, max_chunk_bytes):
            timestamp = words_before * seconds_per_word
            if max_seconds is not None and timestamp >= max_seconds:
                return
            words = len(_WORD.findall(piece))
            yield MediaChunk(piece.encode("utf-8"), timestamp_s=timestamp, duration_s=words * seconds_per_word)
            words_before += words
        pending = ""


def _split_utf8(text: str, max_bytes: int) -> Iterator[str]:
    if len(text.encode("utf-8")) <= max_bytes:
        yield text
        return
    piece = ""
    size = 0
    for character in text:
        width = len(character.encode("utf-8"))
        if size + width > max_bytes:
            yield piece
            piece, size = "", 0
        piece += character
        size += width
    if piece:
        yield piece
