"""The /metrics page of a real server: values that follow from what the test sent."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest

from streaminfer.server import metrics
from streaminfer.server.config import AdmissionConfig, load_config
from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

from conftest import MEDIA, ServerThread, loopback_config
from streamutil import audio_requests, read_wav, run_stream, vad_config


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return every sample of the page by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in metrics.families_by_name(text).values():
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_metrics_follow_a_stream(server) -> None:
    samples, rate = read_wav(MEDIA / "audio" / "Front_Left.wav")
    requests = audio_requests(samples, rate)
    # One chunk with half a sample: a per-chunk error, reason INVALID_ARGUMENT.
    bad = len(requests)
    requests.append(
        pb.StreamRequest(audio=pb.AudioChunk(sequence_number=bad, audio_content=np.zeros(5, "<i2").tobytes()[:-1]))
    )
    port = server.server.metrics_port
    before = scrape(port)
    with grpc.insecure_channel(server.target) as channel:
        outcome = run_stream(channel, vad_config(rate), requests)
    after = scrape(port)

    chunks = len(requests)
    assert len(outcome.acked[pb.MODALITY_AUDIO]) == chunks - 1
    assert delta(after, before, "streaminfer_streams_started_total") == 1
    assert delta(after, before, "streaminfer_streams_ended_total", code="OK") == 1
    assert delta(after, before, "streaminfer_chunks_received_total", modality="audio") == chunks
    assert delta(after, before, "streaminfer_chunks_processed_total", modality="audio") == chunks - 1
    assert delta(after, before, "streaminfer_chunks_dropped_total", modality="audio", reason="invalid_argument") == 1
    assert delta(after, before, "streaminfer_results_total", model="silero_vad", modality="audio") == len(outcome.results)

    # Every acked chunk has one latency, and the latency is at least its parts.
    latency_count = delta(after, before, "streaminfer_chunk_latency_seconds_count", model="silero_vad", modality="audio")
    assert latency_count == chunks - 1
    latency_sum = delta(after, before, "streaminfer_chunk_latency_seconds_sum", model="silero_vad", modality="audio")
    decode_sum = delta(after, before, "streaminfer_decode_seconds_sum", modality="audio")
    assert 0 < decode_sum < latency_sum
    assert delta(after, before, "streaminfer_decode_seconds_count", modality="audio") == chunks
    assert delta(after, before, "streaminfer_queue_wait_seconds_count", model="silero_vad") >= chunks - 1
    assert delta(after, before, "streaminfer_chunk_latency_seconds_bucket", model="silero_vad", modality="audio", le="+Inf") == chunks - 1

    # Batches: the histogram, the close reasons and the item count agree.
    batches = delta(after, before, "streaminfer_batch_size_count", model="silero_vad")
    closed = sum(
        delta(after, before, "streaminfer_batches_total", model="silero_vad", reason=reason) for reason in ("full", "delay")
    )
    assert batches > 0
    assert closed >= batches
    assert delta(after, before, "streaminfer_inference_seconds_count", model="silero_vad") == batches
    fill_sum = delta(after, before, "streaminfer_batch_fill_ratio_sum", model="silero_vad")
    size_sum = delta(after, before, "streaminfer_batch_size_sum", model="silero_vad")
    max_batch = value(after, "streaminfer_max_batch_size", model="silero_vad")
    assert max_batch == 256
    assert fill_sum == pytest.approx(size_sum / max_batch)
    assert delta(after, before, "streaminfer_time_to_first_result_seconds_count") == 1
    # At 48 kHz the resampler keeps a few samples back, so a 32 ms chunk's last
    # window completes with the next chunk: most chunks wait for later input.
    input_waits = delta(after, before, "streaminfer_input_wait_seconds_count", model="silero_vad")
    assert input_waits == chunks - 1, "every decoded chunk is counted once"
    assert delta(after, before, "streaminfer_input_wait_seconds_sum", model="silero_vad") > 0
    # The 48 kHz resampling kernel is made at load time, so the stream finds it cached.
    assert rate == 48_000
    cache = {"model": "silero_vad", "cache": "resampler_kernel"}
    assert delta(after, before, "streaminfer_cache_requests_total", **cache, result="hit") == 1
    assert delta(after, before, "streaminfer_cache_requests_total", **cache, result="miss") == 0
    assert delta(after, before, "streaminfer_write_seconds_count") >= 1


def test_sampled_levels(server) -> None:
    server.server.monitor.sampler.sample(force=True)
    samples = scrape(server.server.metrics_port)
    assert value(samples, "streaminfer_decode_threads") == server.config.decode_threads
    assert value(samples, "streaminfer_model_instances", model="silero_vad") == 1
    assert value(samples, "streaminfer_model_healthy", model="silero_vad") == 1
    assert value(samples, "streaminfer_queue_limit", model="silero_vad") == 4096
    assert value(samples, "streaminfer_process_resident_memory_bytes") > 100 * 1024 * 1024
    assert value(samples, "streaminfer_process_cpu_seconds_total") > 0
    assert value(samples, "streaminfer_model_load_seconds", model="silero_vad") > 0
    assert value(samples, "streaminfer_event_loop_lag_seconds_count") > 0
    # No GPU here: the GPU series are absent, not zero.
    assert not any(name.startswith("streaminfer_gpu_") for name, _ in samples)


def test_open_stream_counts_as_active_with_credits(server) -> None:
    samples, rate = read_wav(MEDIA / "audio" / "Front_Left.wav")
    stub = pb_grpc.InferenceServiceStub(grpc.insecure_channel(server.target))
    first_chunks = audio_requests(samples, rate)[:3]

    def messages():
        yield pb.StreamRequest(config=vad_config(rate))
        yield from first_chunks
        time.sleep(2.0)

    call = stub.Stream(messages(), timeout=30)
    assert next(call).HasField("session_accepted")
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            server.server.monitor.sampler.sample(force=True)
            level = value(scrape(server.server.metrics_port), "streaminfer_streams_active")
            if level >= 1:
                break
            time.sleep(0.05)
        assert level >= 1
    finally:
        call.cancel()


def test_rejections_by_reason() -> None:
    base = load_config(None)
    config = loopback_config(dataclasses.replace(base, admission=AdmissionConfig(max_streams=1, max_queue_wait_ms=0, max_busy_fraction=0)))
    thread = ServerThread(config).start()
    try:
        before = scrape(thread.server.metrics_port)
        # Every reason is on the page from the start, so that rate() works before the first rejection.
        for reason in metrics.REJECTION_REASONS:
            assert ("streaminfer_streams_rejected_total", (("reason", reason),)) in before
        channel = grpc.insecure_channel(thread.target)
        stub = pb_grpc.InferenceServiceStub(channel)

        def held():
            yield pb.StreamRequest(config=vad_config(16_000))
            time.sleep(3.0)

        first = stub.Stream(held(), timeout=30)
        assert next(first).HasField("session_accepted")
        with pytest.raises(grpc.RpcError) as rejected:
            run_stream(channel, vad_config(16_000), [])
        assert rejected.value.code() == grpc.StatusCode.UNAVAILABLE
        first.cancel()
        after = scrape(thread.server.metrics_port)
        assert delta(after, before, "streaminfer_streams_rejected_total", reason="max_streams") == 1
        assert delta(after, before, "streaminfer_streams_started_total") == 1
        channel.close()
    finally:
        thread.stop()


def test_every_defined_metric_is_exported(server) -> None:
    names = set(metrics.exported_names())
    assert "streaminfer_chunk_latency_seconds_bucket" in names
    assert "streaminfer_streams_started_total" in names
    assert all(name.startswith("streaminfer_") for name in names)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as response:
        page = response.read().decode()
    for family in metrics.families_by_name(page):
        if family.startswith("streaminfer_"):
            assert any(name.startswith(family) for name in names), family


def test_busy_metrics_port_fails_at_start() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "streaminfer.server.cli", "serve", "--port", "0", "--metrics-port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert "--metrics-port" in result.stderr


def test_metrics_off(tmp_path) -> None:
    # A process of its own: turning metrics off turns them off for the whole process.
    config = tmp_path / "server.toml"
    config.write_text('[[models]]\nname = "silero_vad"\n')
    server = subprocess.Popen(
        [sys.executable, "-m", "streaminfer.server.cli", "serve", "--config", str(config), "--port", "0",
         "--metrics-port", "-1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert "listening on" in server.stdout.readline()
        server.send_signal(signal.SIGTERM)
        stdout, stderr = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
    assert server.returncode == 0
    assert "metrics on" not in stdout
    assert "metrics off" in stderr


def test_disabled_metrics_ignore_updates() -> None:
    off = metrics._Off()
    off.labels("a", "b").inc()
    off.labels("a").observe(1.0)
    off.set(3)
    assert off.labels() is off


def test_batched_histogram_matches_observe() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    bounds = (0.001, 0.01, 0.1, 1.0)
    direct = Histogram("direct_seconds", "d", ["model"], buckets=bounds, registry=registry)
    batched = metrics.BatchedHistogram(Histogram("batched_seconds", "b", ["model"], buckets=bounds, registry=registry))
    # Values on the bounds belong to the bucket of that bound (le is inclusive).
    values = [0.0, 0.0005, 0.001, 0.002, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 30.0]
    recorder = batched.labels("m")
    for value in values:
        direct.labels("m").observe(value)
        recorder.observe(value)
    metrics.flush()
    recorder.observe(0.003)
    direct.labels("m").observe(0.003)
    metrics.flush()

    def page(name: str) -> dict:
        family = next(family for family in registry.collect() if family.name == name)
        return {(sample.name.removeprefix(name), sample.labels.get("le")): sample.value for sample in family.samples}

    assert page("batched_seconds") == page("direct_seconds")
    assert page("batched_seconds")[("_count", None)] == len(values) + 1


def test_whole_windows_at_16k_wait_for_no_input(server) -> None:
    samples, rate = read_wav(MEDIA / "audio" / "Front_Left.wav")
    resampled = samples[::3]  # 48 kHz to 16 kHz, crudely; only the timing matters here
    requests = audio_requests(resampled, 16_000)
    port = server.server.metrics_port
    before = scrape(port)
    with grpc.insecure_channel(server.target) as channel:
        run_stream(channel, vad_config(16_000), requests)
    after = scrape(port)
    assert delta(after, before, "streaminfer_input_wait_seconds_count", model="silero_vad") == len(requests)
    # Whole 512-sample chunks complete their own window at once; only a
    # partial last chunk waits, for the flush at the end of input.
    waited_none = delta(after, before, "streaminfer_input_wait_seconds_bucket", model="silero_vad", le="0.001")
    assert waited_none >= len(requests) - 1
