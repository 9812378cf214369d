"""Traces sent over OTLP to a real receiver on loopback: the call span and the stage spans of chunks."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import threading

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from conftest import MEDIA
from streamutil import audio_requests, read_wav, run_stream, vad_config
from streaminfer.server import tracing
from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

STREAM_SPAN = "/streaminfer.v1.InferenceService/Stream"
INFER_SPAN = "/streaminfer.v1.InferenceService/Infer"
# The caller's span, sent as W3C trace context in the call metadata.
CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
STAGES = ("queue", "batch", "inference", "postprocess")


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                service = {
                    attribute.key: attribute.value.string_value for attribute in resource_spans.resource.attributes
                }.get("service.name")
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def attributes(span) -> dict:
    found = {}
    for attribute in span.attributes:
        value = attribute.value
        found[attribute.key] = value.string_value if value.HasField("string_value") else value.int_value
    return found


@pytest.fixture
def receiver():
    servicer = Receiver()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(grace=None)


def test_stage_spans_reach_an_otlp_receiver(receiver, tmp_path) -> None:
    servicer, port = receiver
    config = tmp_path / "server.toml"
    config.write_text('[tracing]\nchunk_sample_ratio = 1.0\n\n[[models]]\nname = "silero_vad"\n')
    environment = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_SERVICE_NAME": "streaminfer-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "streaminfer.server.cli", "--log-level", "WARNING", "serve", "--config", str(config),
         "--port", "0", "--metrics-port", "-1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert match, f"unexpected first line: {line!r}"
        samples, rate = read_wav(MEDIA / "audio" / "Front_Left.wav")
        requests = audio_requests(samples, rate)[:20]
        traceparent = (("traceparent", f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"),)
        with grpc.insecure_channel(f"127.0.0.1:{match.group(1)}") as channel:
            outcome = run_stream(channel, vad_config(rate), requests, metadata=traceparent)
            pb_grpc.InferenceServiceStub(channel).Infer(
                pb.InferRequest(
                    model="silero_vad",
                    audio_content=samples[: rate // 2].tobytes(),
                    audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=rate),
                ),
                timeout=30,
            )
        assert len(outcome.acked[pb.MODALITY_AUDIO]) == 20
        # Draining and stopping flush the spans still buffered.
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, server.stderr.read() if server.stderr else ""
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)

    spans = [span for service, span in servicer.spans if service == "streaminfer-under-test"]
    (stream,) = [span for span in spans if span.name == STREAM_SPAN]
    (infer,) = [span for span in spans if span.name == INFER_SPAN]
    assert infer.trace_id != stream.trace_id
    # The stream joins the caller's trace.
    assert stream.trace_id.hex() == CALLER_TRACE_ID
    assert stream.parent_span_id.hex() == CALLER_SPAN_ID
    assert attributes(stream)["rpc.method"] == "Stream"
    chunks = [span for span in spans if span.name == "chunk"]
    assert len(chunks) == 20, "every chunk is sampled at chunk_sample_ratio = 1"
    assert {span.parent_span_id for span in chunks} == {stream.span_id}
    assert {span.trace_id for span in spans if span is not infer} == {stream.trace_id}
    stream_ids = {attributes(span)["streaminfer.stream_id"] for span in chunks}
    assert stream_ids == {attributes(stream)["streaminfer.stream_id"]}
    assert sorted(attributes(span)["streaminfer.sequence_number"] for span in chunks) == list(range(20))

    by_parent: dict[bytes, list] = {}
    for span in spans:
        by_parent.setdefault(span.parent_span_id, []).append(span)
    with_model_stages = 0
    for chunk in chunks:
        children = by_parent.get(chunk.span_id, [])
        names = [span.name for span in children]
        assert names.count("decode") == 1
        assert chunk.start_time_unix_nano <= min(span.start_time_unix_nano for span in children)
        assert chunk.end_time_unix_nano >= max(span.end_time_unix_nano for span in children)
        if "inference" in names:
            with_model_stages += 1
            assert sorted(name for name in names if name != "decode") == sorted(STAGES)
            for span in children:
                if span.name in STAGES:
                    assert attributes(span)["streaminfer.model"] == "silero_vad"
                    assert attributes(span)["streaminfer.batch_size"] >= 1
                    assert attributes(span)["streaminfer.stream_id"] in stream_ids
    # A 32 ms chunk at 48 kHz fills one 512-sample window at 16 kHz, after the
    # resampler's short hold-back: nearly every chunk runs the model itself.
    assert with_model_stages >= 18


def test_tracing_is_off_without_the_environment(monkeypatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.requested()
    assert tracing.setup(0.5) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    assert tracing.requested()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not tracing.requested()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.requested()
