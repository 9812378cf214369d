"""A saved TorchScript or torch.export model is served, batched, and matches the model run directly."""

from __future__ import annotations

import dataclasses
import pathlib

import grpc
import numpy as np
import pytest
import torch

from conftest import MEDIA, ServerThread, loopback_config
from streamutil import audio_requests, read_wav, run_stream
from streaminfer.server.config import BatchingConfig, ModelConfig, ServerConfig
from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

WINDOW = 480  # 10 ms at 48 kHz


class FrameFeatures(torch.nn.Module):
    """Energy, peak and a learned projection of each audio window."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.projection = torch.nn.Linear(WINDOW, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        energy = (x * x).mean(dim=1, keepdim=True)
        peak = x.abs().amax(dim=1, keepdim=True)
        return torch.cat([energy, peak, self.projection(x)], dim=1)


@pytest.fixture(scope="module")
def user_server(tmp_path_factory) -> ServerThread:
    folder: pathlib.Path = tmp_path_factory.mktemp("models")
    module = FrameFeatures().eval()
    scripted = folder / "features.pt"
    torch.jit.script(module).save(str(scripted))
    exported = folder / "features.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(module, (torch.zeros(2, 1, WINDOW),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(exported))

    batching = BatchingConfig(max_batch_size=32, max_queue_delay_ms=5.0)
    models = (
        ModelConfig(name="features_ts", kind="torchscript", modality="audio", path=str(scripted),
                    input_shape=(1, WINDOW), batching=batching),
        ModelConfig(name="features_export", kind="torch_export", modality="", path=str(exported),
                    input_shape=(1, WINDOW), batching=batching),
    )
    thread = ServerThread(loopback_config(ServerConfig(models=models))).start()
    yield thread
    thread.stop()


def tensor_values(tensor: pb.Tensor) -> np.ndarray:
    assert tensor.data_type == pb.DATA_TYPE_FLOAT32
    return np.frombuffer(tensor.content, dtype="<f4").reshape(tuple(tensor.shape))


def test_torchscript_stream_matches_direct_call(user_server) -> None:
    samples, rate = read_wav(MEDIA / "audio" / "Front_Center.wav")
    config = pb.StreamConfig(
        models=[pb.ModelSelection(model="features_ts")],
        audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=rate),
    )
    requests = audio_requests(samples, rate)

    with grpc.insecure_channel(user_server.target) as channel:
        outcome = run_stream(channel, config, requests)

    audio = samples.astype(np.float32) / 32768.0
    padded = np.zeros(-(-len(audio) // WINDOW) * WINDOW, dtype=np.float32)
    padded[: len(audio)] = audio
    expected = FrameFeatures().eval()(torch.from_numpy(padded.reshape(-1, 1, WINDOW))).detach().numpy()
    served = np.stack([tensor_values(result.tensor) for result in outcome.results])
    assert served.shape == expected.shape
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)
    assert outcome.answered(pb.MODALITY_AUDIO) == list(range(len(requests)))
    assert outcome.errors == []


def test_exported_model_infer_tensor(user_server) -> None:
    rng = np.random.default_rng(1)
    item = rng.standard_normal((1, WINDOW)).astype(np.float32)

    with grpc.insecure_channel(user_server.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        response = stub.Infer(
            pb.InferRequest(
                model="features_export",
                tensor=pb.Tensor(data_type=pb.DATA_TYPE_FLOAT32, shape=[1, WINDOW], content=item.tobytes()),
            ),
            timeout=30,
        )
        with pytest.raises(grpc.RpcError) as bad_shape:
            stub.Infer(
                pb.InferRequest(
                    model="features_export",
                    tensor=pb.Tensor(data_type=pb.DATA_TYPE_FLOAT32, shape=[1, 7], content=b"\0" * 28),
                ),
                timeout=30,
            )

    expected = FrameFeatures().eval()(torch.from_numpy(item[None])).detach().numpy()[0]
    (result,) = response.results
    np.testing.assert_allclose(tensor_values(result.tensor), expected, rtol=1e-4, atol=1e-5)
    assert bad_shape.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor.shape = [1, 7]" in bad_shape.value.details()


def test_user_model_metadata(user_server) -> None:
    with grpc.insecure_channel(user_server.target) as channel:
        model = pb_grpc.InferenceServiceStub(channel).GetModel(pb.GetModelRequest(name="features_ts"), timeout=5).model
    assert model.modality == pb.MODALITY_AUDIO
    assert list(model.input.shape) == [1, WINDOW]
    assert model.input.data_type == pb.DATA_TYPE_FLOAT32
    assert model.max_batch_size == 32
