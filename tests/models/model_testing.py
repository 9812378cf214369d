"""Helpers for the model tests: sample media and loaded real models."""

from __future__ import annotations

import pathlib
import wave

import numpy as np

from streaminfer.server.config import ModelConfig
from streaminfer.server.models import build_model
from streaminfer.server.models.base import Model

MEDIA = pathlib.Path(__file__).resolve().parent.parent.parent / "media"
# The four short recordings; speech_sample.wav joins them.
SHORT_WAVS = sorted((MEDIA / "audio").glob("[A-Z]*.wav"))


def read_wav(path: pathlib.Path) -> tuple[np.ndarray, int]:
    """Return float32 mono samples in [-1, 1] and the sample rate of a PCM16 WAV."""
    with wave.open(str(path)) as file:
        assert file.getsampwidth() == 2, f"{path} is not 16-bit PCM"
        rate = file.getframerate()
        channels = file.getnchannels()
        samples = np.frombuffer(file.readframes(file.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return samples, rate


def load_model(kind: str, **fields: object) -> Model:
    model = build_model(ModelConfig(name=kind, kind=kind, **fields))
    model.load("cpu")
    return model
