"""Admission control and per-client rate limits on a real server."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grpc
import pytest

from conftest import MEDIA, ServerThread, loopback_config
from streamutil import audio_requests, read_wav, run_stream, vad_config
from streaminfer.server.config import AdmissionConfig, AuthConfig, RateLimitConfig, load_config
from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def limited() -> Iterator[ServerThread]:
    base = load_config(None)
    config = dataclasses.replace(
        loopback_config(base),
        models=tuple(model for model in base.models if model.name == "silero_vad"),
        admission=AdmissionConfig(max_streams=100, max_queue_wait_ms=250, retry_pushback_ms=700),
        rate_limits=RateLimitConfig(streams_per_second=0.5, stream_burst=2, chunks_per_second=20, chunk_burst=10),
        # Rate limits key on accepted API keys; each test uses its own.
        auth=AuthConfig(
            api_keys=("stream-rate-test", "another-client", "chunk-rate-test", "overload-test", "infer-rate-test")
        ),
    )
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


def speech_requests(count: int) -> list[pb.StreamRequest]:
    samples, rate = read_wav(MEDIA / "audio" / "speech_sample.wav")
    return audio_requests(samples, rate)[:count]


def rejection(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> grpc.RpcError:
    stub = pb_grpc.InferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Stream(iter([pb.StreamRequest(config=vad_config())]), metadata=metadata, timeout=30))
    return caught.value


def pushback_ms(error: grpc.RpcError) -> int:
    values = [int(value) for key, value in error.trailing_metadata() or () if key == "grpc-retry-pushback-ms"]
    assert len(values) == 1
    return values[0]


def test_stream_rate_limit_per_key(limited: ServerThread) -> None:
    key = (("x-api-key", "stream-rate-test"),)
    with grpc.insecure_channel(limited.target) as channel:
        # A burst of 2; the third stream within a second is over the limit.
        for _ in range(2):
            outcome = run_stream(channel, vad_config(), [], metadata=key)
            assert outcome.end is not None
        error = rejection(channel, key)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "rate_limits.streams_per_second" in error.details()
        assert error.details().startswith(
            "this client's API key is over its rate of new streams (rate_limits.streams_per_second = 0.5)"
        )
        # One token per 2 s at 0.5 streams/s: the pushback is up to 2000 ms.
        assert 0 < pushback_ms(error) <= 2000
        assert error.details().endswith(f"retry in {pushback_ms(error)} ms")
        # Another key has its own bucket.
        outcome = run_stream(channel, vad_config(), [], metadata=(("x-api-key", "another-client"),))
        assert outcome.end is not None


def test_chunks_over_rate_are_reported(limited: ServerThread) -> None:
    requests = speech_requests(60)
    with grpc.insecure_channel(limited.target) as channel:
        outcome = run_stream(channel, vad_config(), requests, metadata=(("x-api-key", "chunk-rate-test"),))
    limited_chunks = [
        error.sequence_number for error in outcome.errors if error.reason == pb.CHUNK_ERROR_REASON_RATE_LIMITED
    ]
    # A burst of 10 chunks, then about 20 per second: most of a burst of 60 is over.
    assert len(limited_chunks) >= 30
    assert 0 not in limited_chunks
    assert outcome.answered(pb.MODALITY_AUDIO) == list(range(60))
    for error in outcome.errors:
        assert "chunk rate of this client's API key (rate_limits.chunks_per_second = 20)" in error.message


def test_infer_counts_against_chunk_rate(limited: ServerThread) -> None:
    key = (("x-api-key", "infer-rate-test"),)
    request = pb.InferRequest(model="silero_vad", text="not audio")
    outcomes = []
    with grpc.insecure_channel(limited.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        # A burst of 10 chunk tokens, refilled at 20 a second: back-to-back requests run out within 60.
        for _ in range(60):
            try:
                stub.Infer(request, metadata=key, timeout=10)
            except grpc.RpcError as error:
                outcomes.append(error)
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    break
    # Those within the rate reach the input check (text for an audio model); the last one is over the rate.
    *within, over = outcomes
    assert len(within) >= 10
    assert {error.code() for error in within} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate_limits.chunks_per_second = 20" in over.details()
    assert over.details().endswith(f"retry in {pushback_ms(over)} ms")


def test_projected_wait_rejects_new_stream(limited: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    service = limited.server.service
    monkeypatch.setattr(service, "projected_wait", lambda: (0.4, "model silero_vad: 300 item(s) queued"))
    with grpc.insecure_channel(limited.target) as channel:
        error = rejection(channel, (("x-api-key", "overload-test"),))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "about 400 ms in its queues (model silero_vad: 300 item(s) queued)" in error.details()
    assert "admission.max_queue_wait_ms of 250 ms" in error.details()
    assert pushback_ms(error) == 700


def test_projected_busy_fraction_rejects_new_stream(limited: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    from streaminfer.server.load import BusyProjection

    service = limited.server.service
    monkeypatch.setattr(service, "busy_projection", lambda: BusyProjection(measured=0.62, projected=0.91, streams=140))
    with grpc.insecure_channel(limited.target) as channel:
        error = rejection(channel, (("x-api-key", "overload-test"),))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "event loop was busy 0.620 of the last second, and with 0 streams open one more stream projects a busy fraction of 0.910" in error.details()
    assert "over its admission.max_busy_fraction of 0.8;" in error.details()
    assert pushback_ms(error) == 700
    assert service.rejected["UNAVAILABLE"] >= 1


def test_busy_rejection_names_arrival_reserve(limited: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    from streaminfer.server.load import BusyProjection

    service = limited.server.service
    projection = BusyProjection(measured=0.3, projected=0.84, streams=90, arrivals_per_s=250.0, reserve=0.05)
    monkeypatch.setattr(service, "busy_projection", lambda: projection)
    with grpc.insecure_channel(limited.target) as channel:
        error = rejection(channel, (("x-api-key", "overload-test"),))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "projects a busy fraction of 0.840 (including 0.050 kept for the 250 new streams a second arriving)" in error.details()


def test_cold_start_limit_rejects_burst(limited: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    from streaminfer.server.load import BusyProjection

    service = limited.server.service
    cold = BusyProjection(measured=0.0, projected=0.0, streams=0.0, cold_start_limit=0)
    monkeypatch.setattr(service, "busy_projection", lambda: cold)
    with grpc.insecure_channel(limited.target) as channel:
        error = rejection(channel, (("x-api-key", "overload-test"),))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "has not yet measured what one costs, so it admits at most 0 until it has" in error.details()
    assert pushback_ms(error) == 700


def test_rejection_log_flushes_held_back_burst(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import logging
    import types

    from streaminfer.server import service as service_module

    async def scenario() -> None:
        service = service_module.InferenceService(types.SimpleNamespace())  # type: ignore[arg-type]
        busy = service_module.Rejection(grpc.StatusCode.UNAVAILABLE, "near its limit", 1000, "busy")
        waiting = service_module.Rejection(grpc.StatusCode.UNAVAILABLE, "overloaded", 1000, "queue_wait")
        # The first is logged at once; the next three are held back and logged when the interval ends.
        for rejection in (busy, busy, waiting, busy):
            service._log_rejection(rejection)
        await asyncio.sleep(service_module.REJECTION_LOG_INTERVAL_S + 0.3)

    with caplog.at_level(logging.INFO, logger="streaminfer.server.service"):
        asyncio.run(scenario())
    # Only this test's service: other servers of this module may log rejections too.
    lines = [
        record.getMessage()
        for record in caplog.records
        if "since the last report" in record.getMessage() and record.getMessage().endswith(("near its limit", "overloaded"))
    ]
    assert lines[0].startswith("rejected 1 new stream(s) since the last report (busy 1)")
    assert lines[1].startswith("rejected 3 new stream(s) since the last report (busy 2, queue_wait 1)")
    assert lines[1].endswith("the latest with UNAVAILABLE: near its limit")
    assert len(lines) == 2


def test_start_up_line_names_rate_limits() -> None:
    from streaminfer.server.app import describe_rate_limits

    assert describe_rate_limits(RateLimitConfig(), by_api_key=False) == "off"
    both = RateLimitConfig(streams_per_second=0.5, chunks_per_second=20)
    assert describe_rate_limits(both, by_api_key=True) == "new streams 0.5/s (burst 1) and chunks 20/s (burst 20) per API key"
    chunks = RateLimitConfig(chunks_per_second=40, chunk_burst=5)
    assert describe_rate_limits(chunks, by_api_key=False) == "chunks 40/s (burst 5) per client address"
