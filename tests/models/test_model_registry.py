"""The model registry: config kinds to model classes, and device resolution."""

from __future__ import annotations

import pytest
import torch

from streaminfer.server.config import MODEL_KINDS, ConfigError, ModelConfig
from streaminfer.server.models import build_model, resolve_device
from streaminfer.server.models.noop import NoopModel
from streaminfer.server.models.silero_vad import SileroVadModel
from streaminfer.server.models.text_embedding import MiniLmEmbeddingModel
from streaminfer.server.models.user import UserModel
from streaminfer.server.models.vision import HaarFaceDetector, HogPeopleDetector
from streaminfer.v1 import streaminfer_pb2 as pb

EXPECTED = {
    "silero_vad": (SileroVadModel, pb.MODALITY_AUDIO, True),
    "minilm_embedding": (MiniLmEmbeddingModel, pb.MODALITY_TEXT, False),
    "hog_people": (HogPeopleDetector, pb.MODALITY_VIDEO, False),
    "haar_faces": (HaarFaceDetector, pb.MODALITY_VIDEO, False),
    "torchscript": (UserModel, pb.MODALITY_AUDIO, False),
    "torch_export": (UserModel, pb.MODALITY_AUDIO, False),
    "noop": (NoopModel, pb.MODALITY_AUDIO, False),
}


def test_every_config_kind_has_a_model() -> None:
    assert set(MODEL_KINDS) <= set(EXPECTED)


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_build_model_by_kind(kind: str) -> None:
    model_class, modality, stateful = EXPECTED[kind]
    config = ModelConfig(name=f"my_{kind}", kind=kind, modality="audio", path="model.pt", input_shape=(1, 512))
    model = build_model(config)
    assert type(model) is model_class
    assert model.info.name == f"my_{kind}"
    assert model.info.modality == modality
    assert model.info.stateful is stateful
    assert model.info.description


def test_build_model_rejects_unknown_kind() -> None:
    with pytest.raises(ConfigError, match="kind = 'resnet' is invalid"):
        build_model(ModelConfig(name="x", kind="resnet"))


def test_config_description_overrides() -> None:
    model = build_model(ModelConfig(name="vad", kind="silero_vad", description="my VAD"))
    assert model.info.description == "my VAD"


def test_resolve_device() -> None:
    assert resolve_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("auto") == "cuda:0"
        assert resolve_device("cuda") == "cuda:0"
    else:
        assert resolve_device("auto") == "cpu"
        with pytest.raises(ConfigError, match="torch sees 0 CUDA device"):
            resolve_device("cuda:0")
    with pytest.raises(ConfigError, match="is invalid"):
        resolve_device("cuda:x")
    with pytest.raises(ConfigError, match="is invalid"):
        resolve_device("tpu")
