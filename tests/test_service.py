"""Health, reflection, model metadata and the unary Infer call."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import MEDIA
from streamutil import duration_seconds, jpeg, read_wav, video_frames
from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

BUILT_IN = {"silero_vad", "minilm_embedding", "hog_people", "haar_faces"}


def test_health_serving(channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "streaminfer.v1.InferenceService"):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_services(channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    response = next(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {service.name for service in response.list_services_response.service}
    assert "streaminfer.v1.InferenceService" in names
    assert "grpc.health.v1.Health" in names


def test_list_and_get_models(channel) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    models = {model.name: model for model in stub.ListModels(pb.ListModelsRequest(), timeout=5).models}
    assert BUILT_IN <= set(models)
    assert models["silero_vad"].modality == pb.MODALITY_AUDIO
    assert models["silero_vad"].stateful
    assert models["minilm_embedding"].modality == pb.MODALITY_TEXT
    assert models["hog_people"].modality == pb.MODALITY_VIDEO
    assert models["silero_vad"].device == "cpu" or models["silero_vad"].device.startswith("cuda")

    vad = stub.GetModel(pb.GetModelRequest(name="silero_vad"), timeout=5).model
    assert vad == models["silero_vad"]


def test_get_unknown_model(channel) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    try:
        stub.GetModel(pb.GetModelRequest(name="nope"), timeout=5)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "'nope'" in error.details()
    else:
        raise AssertionError("GetModel of an unknown model succeeded")


def test_infer_audio_clip(channel) -> None:
    samples, rate = read_wav(MEDIA / "audio" / "Front_Center.wav")
    stub = pb_grpc.InferenceServiceStub(channel)

    response = stub.Infer(
        pb.InferRequest(
            model="silero_vad",
            audio_content=samples.tobytes(),
            audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=rate),
        ),
        timeout=30,
    )

    ends = [r for r in response.results if r.speech.event_type == pb.SPEECH_EVENT_TYPE_SPEECH_END]
    assert len(ends) == 2
    assert 0.0 <= duration_seconds(ends[0].start_time) < duration_seconds(ends[0].end_time) <= len(samples) / rate


def test_infer_image_and_text(channel) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    frame = video_frames(MEDIA / "video" / "vtest.avi", [100])[0]

    detected = stub.Infer(
        pb.InferRequest(
            model="hog_people",
            image_content=jpeg(frame),
            video_format=pb.VideoFormat(encoding=pb.IMAGE_ENCODING_JPEG),
        ),
        timeout=30,
    )
    embedded = stub.Infer(pb.InferRequest(model="minilm_embedding", text="No full stop at the end"), timeout=30)

    assert len(detected.results) == 1
    assert len(detected.results[0].detections.detections) >= 1
    assert len(embedded.results) == 1
    assert embedded.results[0].embedding.text == "No full stop at the end"
    assert len(embedded.results[0].embedding.values) == 384
    assert abs(np.linalg.norm(embedded.results[0].embedding.values) - 1.0) < 1e-4


def test_infer_wrong_input_kind(channel) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    try:
        stub.Infer(pb.InferRequest(model="silero_vad", text="hello"), timeout=5)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "audio_content" in error.details()
    else:
        raise AssertionError("Infer with text for an audio model succeeded")


def test_infer_errors_name_infer_fields(channel) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Infer(pb.InferRequest(model="silero_vad", audio_content=b"\0\0"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("audio_format is missing")
    image_format = pb.VideoFormat(encoding=pb.IMAGE_ENCODING_JPEG)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Infer(pb.InferRequest(model="hog_people", image_content=b"notjpeg", video_format=image_format), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("image_content (7 bytes) is not a valid JPEG image")
