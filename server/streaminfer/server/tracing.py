"""OpenTelemetry traces: a span per gRPC call, and stage spans for sampled chunks.

Tracing is off unless the standard OpenTelemetry variables name an
exporter:

- ``OTEL_TRACES_EXPORTER=otlp`` (or ``console``), or an OTLP endpoint in
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
  turns it on. The OTLP exporter speaks gRPC and reads the other
  ``OTEL_EXPORTER_OTLP_*`` variables (headers, TLS, timeout) itself.
- ``OTEL_SERVICE_NAME`` names the service (default ``streaminfer``), and
  ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` choose which calls
  are traced (default: every call, or as the caller's trace context decides).
- ``OTEL_SDK_DISABLED=true`` turns it off whatever else is set.

Unary calls get their span from opentelemetry-instrumentation-grpc's aio
server interceptor. Stream calls get theirs from the service, with the same
name and ``rpc.*`` attributes: the interceptor keeps the span's context
attached across the handler's yields, and when a stream ends from another
task (a write timeout cancels its handler) detaching it fails with an error
per stream. The service makes the span without attaching it, and passes it
on explicitly. Either way the caller's ``traceparent`` metadata makes the
span part of the caller's trace. In a traced Stream call, a sample of the chunks
(``tracing.chunk_sample_ratio`` of the server config) also gets a ``chunk``
span, child of the call's span, whose children are the stages the chunk went
through: ``decode``, then per model ``queue``, ``batch``, ``inference`` and
``postprocess``. Stage times are recorded on the threads where the stages run
and the spans are made when the chunk is answered, so an unsampled chunk
costs one random draw.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import grpc

logger = logging.getLogger(__name__)

# Monotonic clock to Unix time, in nanoseconds, for span timestamps.
_EPOCH_OFFSET_NS = time.time_ns() - time.monotonic_ns()


def requested() -> bool:
    """True when the environment names a trace exporter."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _epoch_ns(monotonic_s: float) -> int:
    return int(monotonic_s * 1e9) + _EPOCH_OFFSET_NS


@dataclasses.dataclass(slots=True)
class ItemTrace:
    """One model's work on a traced chunk, in monotonic seconds."""

    model: str
    batch_size: int
    enqueued_at: float
    started_at: float
    inference_end: float
    finished_at: float


@dataclasses.dataclass(slots=True)
class ChunkTrace:
    """Stage times of one sampled chunk, filled in by the threads that run the stages."""

    modality: str
    sequence_number: int
    read_at: float
    decode_started: float = 0.0
    decode_ended: float = 0.0
    items: list[ItemTrace] = dataclasses.field(default_factory=list)


class Tracing:
    """The tracer provider of the process and the pieces that use it."""

    def __init__(self, chunk_sample_ratio: float) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.chunk_sample_ratio = chunk_sample_ratio
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "streaminfer")})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(_exporter()))
        self._trace = trace
        self.tracer = self.provider.get_tracer("streaminfer.server")

    def server_interceptor(self) -> Any:
        """Return the aio server interceptor that traces every call but Stream."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return _AllButStream(aio_server_interceptor(tracer_provider=self.provider))

    def start_stream_span(self, method: str, metadata: Any, peer: str) -> Any:
        """Start the span of a Stream call, child of the caller's span when its metadata carries one."""
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind

        carrier = {key: value for key, value in (metadata or ()) if isinstance(value, str)}
        service, _, name = method.lstrip("/").rpartition("/")
        return self.tracer.start_span(
            method,
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name, "net.peer.name": peer},
        )

    def end_stream_span(self, span: Any, code: str, message: str = "") -> None:
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("rpc.grpc.status_code", getattr(_grpc_status(code), "value", (2,))[0])
        if code not in ("OK", "CANCELLED"):
            span.set_status(Status(StatusCode.ERROR, f"{code}: {message}" if message else code))
        span.end()

    def context_of(self, span: Any) -> Any | None:
        """Return a context holding ``span`` when it records, else None."""
        if not span.is_recording():
            return None
        return self._trace.set_span_in_context(span)

    def emit(self, parent: Any, chunk: ChunkTrace, stream_id: str, answered_at: float, error: str | None = None) -> None:
        """Create the spans of one acked or failed chunk under the call span ``parent``."""
        from opentelemetry.trace import Status, StatusCode

        attributes = {
            "streaminfer.stream_id": stream_id,
            "streaminfer.modality": chunk.modality,
            "streaminfer.sequence_number": chunk.sequence_number,
        }
        span = self.tracer.start_span("chunk", context=parent, start_time=_epoch_ns(chunk.read_at), attributes=attributes)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        context = self._trace.set_span_in_context(span)
        if chunk.decode_ended:
            self._stage(context, "decode", chunk.decode_started, chunk.decode_ended, attributes)
        for item in chunk.items:
            stage_attributes = {**attributes, "streaminfer.model": item.model, "streaminfer.batch_size": item.batch_size}
            self._stage(context, "queue", item.enqueued_at, item.started_at, stage_attributes)
            self._stage(context, "batch", item.started_at, item.finished_at, stage_attributes)
            self._stage(context, "inference", item.started_at, item.inference_end, stage_attributes)
            self._stage(context, "postprocess", item.inference_end, item.finished_at, stage_attributes)
        span.end(end_time=_epoch_ns(answered_at))

    def _stage(self, context: Any, name: str, start: float, end: float, attributes: dict[str, Any]) -> None:
        span = self.tracer.start_span(name, context=context, start_time=_epoch_ns(start), attributes=attributes)
        span.end(end_time=_epoch_ns(max(start, end)))

    def shutdown(self) -> None:
        self.provider.shutdown()


class _AllButStream(grpc.aio.ServerInterceptor):
    """Passes Stream calls through untouched and the others to the instrumentation's interceptor."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        if handler_call_details.method.endswith("/Stream"):
            return await continuation(handler_call_details)
        return await self._inner.intercept_service(continuation, handler_call_details)


def _grpc_status(code: str) -> Any:
    return getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN)


def _exporter() -> Any:
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if exporter != "otlp":
        logger.warning("OTEL_TRACES_EXPORTER=%s is not supported here; using otlp (gRPC)", exporter)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def setup(chunk_sample_ratio: float) -> Tracing | None:
    """Return the process's Tracing when the environment names an exporter, else None."""
    if not requested():
        return None
    tracing = Tracing(chunk_sample_ratio)
    logger.info(
        "tracing on: exporter %s; %s of the chunks of traced streams get stage spans",
        os.environ.get("OTEL_TRACES_EXPORTER", "otlp"),
        f"{chunk_sample_ratio:.2%}".replace(".00%", "%"),
    )
    return tracing
