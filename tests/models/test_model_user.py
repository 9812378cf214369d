"""User models from TorchScript and torch.export archives saved by the tests."""

from __future__ import annotations

import pathlib

import cv2
import numpy as np
import pytest
import torch

from model_testing import MEDIA, read_wav
from streaminfer.server.config import ConfigError, ModelConfig
from streaminfer.server.models import build_model
from streaminfer.server.models.base import DecodedChunk, Model, ModelInput, StreamOptions
from streaminfer.server.models.user import UserModel
from streaminfer.v1 import streaminfer_pb2 as pb

WINDOW = 400


class Loudness(torch.nn.Module):
    """Per window: mean power and peak, from a [B, 1, WINDOW] batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack((x.pow(2).mean(-1), x.abs().amax(-1)), dim=-1)


class TinyConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=3, stride=2)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def to_array(tensor: pb.Tensor) -> np.ndarray:
    dtypes = {pb.DATA_TYPE_FLOAT32: "<f4", pb.DATA_TYPE_INT64: "<i8", pb.DATA_TYPE_UINT8: "u1"}
    return np.frombuffer(tensor.content, dtype=dtypes[tensor.data_type]).reshape(tuple(tensor.shape))


def user_model(kind: str, path: pathlib.Path, modality: str, shape: tuple[int, ...], dtype: str = "float32") -> Model:
    config = ModelConfig(
        name=f"user_{kind}", kind=kind, path=str(path), modality=modality, input_shape=shape, input_dtype=dtype
    )
    model = build_model(config)
    model.load("cpu")
    return model


def run(model: Model, items: list[ModelInput]) -> list[pb.StreamResult]:
    runnable = [item for item in items if item.data is not None]
    with torch.inference_mode():
        outputs = model.run_batch(runnable, [None] * len(runnable))
    options = StreamOptions("test", False)
    return [result for item, output in zip(runnable, outputs) for result in model.postprocess(None, item, output, options)]


@pytest.fixture(scope="module")
def torchscript_audio(tmp_path_factory: pytest.TempPathFactory) -> Model:
    path = tmp_path_factory.mktemp("archives") / "loudness.pt"
    torch.jit.script(Loudness()).save(str(path))
    return user_model("torchscript", path, "audio", (1, WINDOW))


@pytest.fixture(scope="module")
def export_video(tmp_path_factory: pytest.TempPathFactory) -> Model:
    path = tmp_path_factory.mktemp("archives") / "convnet.pt2"
    example = torch.rand(2, 3, 32, 48)
    exported = torch.export.export(TinyConvNet(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(exported, str(path))
    return user_model("torch_export", path, "video", (3, 32, 48))


def test_torchscript_audio_windows(torchscript_audio: Model) -> None:
    samples, rate = read_wav(MEDIA / "audio" / "Front_Center.wav")
    state = torchscript_audio.new_preprocess_state(StreamOptions("test", False, rate))
    items = []
    chunk = rate * 32 // 1000
    for sequence_number, offset in enumerate(range(0, len(samples), chunk)):
        data = DecodedChunk(pb.MODALITY_AUDIO, sequence_number, samples[offset : offset + chunk], offset / rate, rate)
        items += torchscript_audio.preprocess(state, data)
    items += torchscript_audio.flush(state, sequence_number)
    results = run(torchscript_audio, items)

    windows = -(-len(samples) // WINDOW)
    assert len(results) == windows
    assert items[-1].completes_sequence_number == sequence_number
    padded = np.zeros(windows * WINDOW, np.float32)
    padded[: len(samples)] = samples
    expected = Loudness()(torch.from_numpy(padded).reshape(windows, 1, WINDOW)).numpy()
    for index, result in enumerate(results):
        assert result.tensor.data_type == pb.DATA_TYPE_FLOAT32
        assert list(result.tensor.shape) == [1, 2]
        np.testing.assert_allclose(to_array(result.tensor), expected[index], rtol=1e-6, atol=1e-9)
        assert result.start_time.ToNanoseconds() / 1e9 == pytest.approx(index * WINDOW / rate, abs=1e-6)


def test_export_video_frames(export_video: Model) -> None:
    capture = cv2.VideoCapture(str(MEDIA / "video" / "vtest.avi"))
    frames = [capture.read()[1] for _ in range(3)]
    capture.release()
    items = []
    for sequence_number, frame in enumerate(frames):
        items += export_video.preprocess(None, DecodedChunk(pb.MODALITY_VIDEO, sequence_number, frame, sequence_number / 10))
    results = run(export_video, items)

    batch = np.stack([item.data for item in items])
    assert batch.shape == (3, 3, 32, 48)
    assert batch.dtype == np.float32
    assert batch.min() >= 0.0
    assert batch.max() <= 1.0
    expected = TinyConvNet()(torch.from_numpy(batch)).detach().numpy()
    assert [result.first_sequence_number for result in results] == [0, 1, 2]
    for index, result in enumerate(results):
        np.testing.assert_allclose(to_array(result.tensor), expected[index], rtol=1e-5, atol=1e-6)


def test_video_input_is_rgb_in_unit_range(export_video: Model) -> None:
    blue = np.zeros((64, 96, 3), np.uint8)
    blue[:, :, 0] = 255  # BGR
    (item,) = export_video.preprocess(None, DecodedChunk(pb.MODALITY_VIDEO, 0, blue, None))
    assert item.data.shape == (3, 32, 48)
    np.testing.assert_array_equal(item.data[2], 1.0)
    np.testing.assert_array_equal(item.data[0], 0.0)


def test_static_batch_export_runs_each_item(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(TinyConvNet(), (torch.rand(1, 3, 32, 48),)), str(path))
    model = user_model("torch_export", path, "video", (3, 32, 48))
    assert model._static_batch_size == 1

    inputs = np.random.default_rng(0).random((3, 3, 32, 48), dtype=np.float32)
    results = run(model, [ModelInput(array, index, index, index) for index, array in enumerate(inputs)])
    expected = TinyConvNet()(torch.from_numpy(inputs)).detach().numpy()
    for index, result in enumerate(results):
        np.testing.assert_allclose(to_array(result.tensor), expected[index], rtol=1e-5, atol=1e-6)


def test_infer_tensor_matches_direct_call(export_video: Model) -> None:
    array = np.random.default_rng(1).random((3, 32, 48), dtype=np.float32)
    tensor = pb.Tensor(data_type=pb.DATA_TYPE_FLOAT32, shape=[3, 32, 48], content=array.astype("<f4").tobytes())
    output = export_video.infer_tensor(tensor)

    expected = TinyConvNet()(torch.from_numpy(array)[None]).detach().numpy()[0]
    assert list(output.shape) == [5]
    np.testing.assert_allclose(to_array(output), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "tensor, message",
    [
        (pb.Tensor(data_type=pb.DATA_TYPE_INT64, shape=[3, 32, 48], content=bytes(3 * 32 * 48 * 8)), "tensor.data_type = DATA_TYPE_INT64"),
        (pb.Tensor(data_type=pb.DATA_TYPE_FLOAT32, shape=[3, 32, 40], content=bytes(3 * 32 * 40 * 4)), r"tensor.shape = \[3, 32, 40\]"),
        (pb.Tensor(data_type=pb.DATA_TYPE_FLOAT32, shape=[1, 3, 32, 48], content=bytes(3 * 32 * 48 * 4)), "expected \\[3, 32, 48\\]"),
        (pb.Tensor(data_type=pb.DATA_TYPE_FLOAT32, shape=[3, 32, 48], content=bytes(10)), "tensor.content has 10 bytes"),
    ],
)
def test_infer_tensor_rejects_mismatch(export_video: Model, tensor: pb.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        export_video.infer_tensor(tensor)


def test_free_size_tensor_input(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "double.pt"
    torch.jit.script(Doubler()).save(str(path))
    model = user_model("torchscript", path, "", (-1,), dtype="int64")
    for length in (1, 7):
        values = np.arange(length, dtype="<i8")
        output = model.infer_tensor(pb.Tensor(data_type=pb.DATA_TYPE_INT64, shape=[length], content=values.tobytes()))
        assert output.data_type == pb.DATA_TYPE_INT64
        np.testing.assert_array_equal(to_array(output), values * 2)
    with pytest.raises(ValueError, match="raw tensors only"):
        model.preprocess(None, DecodedChunk(pb.MODALITY_AUDIO, 0, np.zeros(4, np.float32), 0.0, 16000))


class Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"modality": "text", "input_shape": (4,)}, "modality = 'text'"),
        ({"modality": "audio", "input_shape": (-1,)}, "last size is the window"),
        ({"modality": "audio", "input_shape": (2, 400)}, "must be 1"),
        ({"modality": "video", "input_shape": (4, 32, 32)}, "C = 1 or 3"),
        ({"modality": "audio", "input_shape": (400,), "input_dtype": "int64"}, "expected float32 or float16"),
        ({"modality": "", "input_shape": ()}, "input_shape is missing"),
    ],
)
def test_invalid_specs_rejected(fields: dict, message: str) -> None:
    config = ModelConfig(name="bad", kind="torchscript", path="unused.pt", **fields)
    with pytest.raises(ConfigError, match=message):
        UserModel(config)


def test_missing_archive_rejected(tmp_path: pathlib.Path) -> None:
    model = build_model(ModelConfig(name="gone", kind="torchscript", path=str(tmp_path / "gone.pt"), input_shape=(4,)))
    with pytest.raises(ConfigError, match="is not a file"):
        model.load("cpu")
