"""The served models, and the registry that builds one from its config ``kind``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from streaminfer.server.config import ConfigError, ModelConfig
from streaminfer.server.models.base import Model
from streaminfer.server.models.noop import NoopModel
from streaminfer.server.models.silero_vad import SileroVadModel
from streaminfer.server.models.text_embedding import MiniLmEmbeddingModel
from streaminfer.server.models.user import UserModel
from streaminfer.server.models.vision import HaarFaceDetector, HogPeopleDetector

__all__ = ["MODEL_CLASSES", "build_model", "resolve_device"]

MODEL_CLASSES: dict[str, Callable[[ModelConfig], Model]] = {
    "silero_vad": SileroVadModel,
    "minilm_embedding": MiniLmEmbeddingModel,
    "hog_people": HogPeopleDetector,
    "haar_faces": HaarFaceDetector,
    "torchscript": UserModel,
    "torch_export": UserModel,
    "noop": lambda config: NoopModel(config.name, config.modality),
}


def build_model(config: ModelConfig) -> Model:
    """Return an unloaded model for ``config``. Raises ConfigError for an unknown kind or a bad user-model spec."""
    factory = MODEL_CLASSES.get(config.kind)
    if factory is None:
        raise ConfigError(f"model {config.name!r}: kind = {config.kind!r} is invalid: expected one of {', '.join(MODEL_CLASSES)}")
    return factory(config)


def resolve_device(device: str) -> str:
    """Return the torch device for a config value: "auto" is "cuda:0" when torch.cuda.is_available(), else "cpu"."""
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        index_text = device.removeprefix("cuda").removeprefix(":") or "0"
        if not index_text.isdigit():
            raise ConfigError(f"device = {device!r} is invalid: expected auto, cpu, cuda or cuda:N")
        index = int(index_text)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            raise ConfigError(
                f"device = {device!r} is not available: torch sees {count} CUDA device(s); use auto or cpu"
            )
        return f"cuda:{index}"
    raise ConfigError(f"device = {device!r} is invalid: expected auto, cpu, cuda or cuda:N")
