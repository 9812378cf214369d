"""Payloads the streams send: audio at a sample rate, JPEG frames and sentences of text.

Each source is built once per process and shared by its streams. Streams
start at different offsets, so they do not send the same bytes at once.
"""

from __future__ import annotations

import io
import pathlib
import re
import wave

import numpy as np

__all__ = ["AudioSource", "TextSource", "VideoSource", "SIGNALS"]

SIGNALS = ("sine", "noise", "silence", "bursts")


class AudioSource:
    """Mono 16-bit PCM at ``sample_rate`` Hz, looped, cut into ``chunk_ms`` chunks."""

    def __init__(self, samples: np.ndarray, sample_rate: int, chunk_ms: float) -> None:
        if not chunk_ms > 0:
            raise ValueError(f"chunk length {chunk_ms!r} ms is invalid: expected milliseconds > 0")
        self.sample_rate = sample_rate
        self.chunk_samples = max(1, round(sample_rate * chunk_ms / 1000.0))
        self.interval_s = self.chunk_samples / sample_rate
        # At least two chunks long, so every offset has a whole chunk after it.
        repeats = max(1, -(-2 * self.chunk_samples // max(1, len(samples))))
        self._samples = np.tile(samples.astype("<i2"), repeats)

    @classmethod
    def from_wav(cls, path: str | pathlib.Path, sample_rate: int, chunk_ms: float) -> AudioSource:
        """Read a 16-bit PCM WAV file, average its channels and resample it linearly to ``sample_rate``."""
        with wave.open(str(path), "rb") as reader:
            if reader.getsampwidth() != 2:
                raise ValueError(f"{path}: {8 * reader.getsampwidth()}-bit samples; expected 16-bit PCM")
            rate, channels = reader.getframerate(), reader.getnchannels()
            data = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2")
        mono = data.reshape(-1, channels).mean(axis=1)
        if rate != sample_rate and len(mono) > 1:
            count = max(1, round(len(mono) * sample_rate / rate))
            mono = np.interp(np.arange(count) * (rate / sample_rate), np.arange(len(mono)), mono)
        return cls(np.clip(mono, -32768, 32767).astype("<i2"), sample_rate, chunk_ms)

    @classmethod
    def generated(cls, signal: str, sample_rate: int, chunk_ms: float, seconds: float = 10.0) -> AudioSource:
        """Generate a signal: a 440 Hz sine, white noise, silence, or noise bursts (0.5 s on, 0.5 s off)."""
        count = max(1, round(seconds * sample_rate))
        t = np.arange(count) / sample_rate
        rng = np.random.default_rng(1)
        if signal == "sine":
            values = 8000 * np.sin(2 * np.pi * 440 * t)
        elif signal == "noise":
            values = rng.normal(0, 3000, count)
        elif signal == "silence":
            values = np.zeros(count)
        elif signal == "bursts":
            values = rng.normal(0, 3000, count) * ((t % 1.0) < 0.5)
        else:
            raise ValueError(f"signal {signal!r} is invalid: expected one of {', '.join(SIGNALS)}")
        return cls(np.clip(values, -32768, 32767).astype("<i2"), sample_rate, chunk_ms)

    def chunk(self, stream_index: int, chunk_index: int) -> bytes:
        length = len(self._samples) - self.chunk_samples
        offset = (chunk_index * self.chunk_samples + stream_index * 997) % max(1, length)
        return self._samples[offset : offset + self.chunk_samples].tobytes()


class VideoSource:
    """JPEG frames: up to ``max_frames`` frames of a video file through OpenCV, or one generated image."""

    def __init__(self, frames: list[bytes], fps: float, origin: str) -> None:
        if not frames:
            raise ValueError("no video frames to send")
        if not fps > 0:
            raise ValueError(f"frame rate {fps!r} is invalid: expected frames per second > 0")
        self.frames = frames
        self.interval_s = 1.0 / fps
        self.origin = origin

    @classmethod
    def load(cls, path: str | pathlib.Path | None, fps: float, max_frames: int = 50) -> VideoSource:
        """Frames of ``path`` when OpenCV is installed and the file opens, else a generated 320x240 image."""
        if path is not None and pathlib.Path(path).exists():
            try:
                import cv2
            except ImportError:
                cv2 = None
            if cv2 is not None:
                capture = cv2.VideoCapture(str(path))
                frames = []
                try:
                    while len(frames) < max_frames:
                        ok, image = capture.read()
                        if not ok:
                            break
                        encoded_ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
                        if encoded_ok:
                            frames.append(encoded.tobytes())
                finally:
                    capture.release()
                if frames:
                    return cls(frames, fps, f"{path} through OpenCV")
        return cls([generated_jpeg()], fps, "generated 320x240 image (Pillow)")

    def chunk(self, stream_index: int, chunk_index: int) -> bytes:
        return self.frames[(stream_index * 7 + chunk_index) % len(self.frames)]


def generated_jpeg(width: int = 320, height: int = 240) -> bytes:
    """Draw a test pattern and encode it as JPEG with Pillow, which matplotlib already needs."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) % 64) * 4], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


_SENTENCE = re.compile(r"[^.!?]+[.!?]+\s*")


class TextSource:
    """Whole sentences, each sent when it would be spoken at ``words_per_minute``."""

    def __init__(self, text: str, words_per_minute: float) -> None:
        if not words_per_minute > 0:
            raise ValueError(f"text pace {words_per_minute!r} is invalid: expected words per minute > 0")
        sentences = [" ".join(match.group(0).split()) + " " for match in _SENTENCE.finditer(text)]
        self.sentences = [s for s in sentences if s.strip()] or ["The quick brown fox jumps over the lazy dog. "]
        self.seconds_per_word = 60.0 / words_per_minute

    @classmethod
    def load(cls, path: str | pathlib.Path | None, words_per_minute: float) -> TextSource:
        text = pathlib.Path(path).read_text(encoding="utf-8") if path is not None and pathlib.Path(path).exists() else ""
        return cls(text, words_per_minute)

    def sentence(self, stream_index: int, chunk_index: int) -> str:
        return self.sentences[(stream_index * 3 + chunk_index) % len(self.sentences)]

    def duration_s(self, sentence: str) -> float:
        return max(1, len(sentence.split())) * self.seconds_per_word
