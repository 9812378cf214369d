"""The gRPC servicer of streaminfer.v1.InferenceService.

Admission happens right after a stream's first message (its config) is read
and before anything else, so a rejected stream costs the server almost nothing:

============================  ==================  =================================
situation                     status              grpc-retry-pushback-ms
============================  ==================  =================================
server draining (SIGTERM)     UNAVAILABLE         admission.retry_pushback_ms
admission.max_streams open    UNAVAILABLE         admission.retry_pushback_ms
projected busy fraction high  UNAVAILABLE         admission.retry_pushback_ms
projected queue wait too long UNAVAILABLE         admission.retry_pushback_ms
API key over streams/s        RESOURCE_EXHAUSTED  until the key's next token
============================  ==================  =================================

UNAVAILABLE means that this server cannot take the stream now and another
replica, or this one after the pushback, can: load balancers and retry
policies retry it. RESOURCE_EXHAUSTED means that the client itself is over its
quota: another replica would reject it too, so only waiting helps.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import secrets
import time
import collections
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from streaminfer.server import logs, metrics
from streaminfer.server.batcher import ItemDropped, ModelRunner, QueueFull, WorkItem
from streaminfer.server.errors import StreaminferError
from streaminfer.server.executor import Executor
from streaminfer.server.models.base import StreamOptions, set_duration
from streaminfer.server.models.user import DATA_TYPES
from streaminfer.server.session import Session
from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from streaminfer.server.load import BusyProjection

logger = logging.getLogger(__name__)


_END_STATUS = {
    pb.STREAM_END_REASON_DRAINING: (
        grpc.StatusCode.UNAVAILABLE,
        "the server is shutting down; every chunk it read was answered; continue on a new stream",
    ),
    pb.STREAM_END_REASON_MAX_DURATION: (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "the stream reached the server's limits.max_stream_duration_s of {max_duration:g} s; every chunk it read "
        "was answered; continue on a new stream",
    ),
    pb.STREAM_END_REASON_IDLE_TIMEOUT: (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "the stream sent nothing for the server's limits.idle_timeout_s of {idle:g} s; open a new stream when "
        "there is media to send",
    ),
}


SERVICE_METHOD_STREAM = f"/{pb.DESCRIPTOR.services_by_name['InferenceService'].full_name}/Stream"

# Rejected streams are logged in one line per this many seconds at most.
REJECTION_LOG_INTERVAL_S = 1.0


class Rejection(Exception):
    """A stream rejected at admission; ``reason`` is its metric label."""

    def __init__(self, code: grpc.StatusCode, message: str, pushback_ms: int | None, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.pushback_ms = pushback_ms
        self.reason = reason


class InferenceService(pb_grpc.InferenceServiceServicer):
    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        # Each running stream, with the context of its call.
        self.active_sessions: dict[Session, grpc.aio.ServicerContext] = {}
        self.draining = False
        # Set by the server: projected queue wait in seconds, and the rate limiter.
        self.projected_wait: Callable[[], tuple[float, str]] = lambda: (0.0, "")
        self.learned_max_streams: Callable[[], int | None] = lambda: None
        self.busy_projection: Callable[[], BusyProjection | None] = lambda: None
        self.rate_limiter: Any = None
        # Set by the server when tracing is on.
        self.tracing: Any = None
        self.unhealthy_models: set[str] = set()
        self.rejected = collections.Counter[str]()
        self._rejections_unlogged = collections.Counter[str]()
        self._latest_rejection: Rejection | None = None
        self._rejection_logged_at = -math.inf
        self._rejection_flush: asyncio.TimerHandle | None = None

    def _log_rejection(self, rejection: Rejection) -> None:
        """Log rejections at most once per REJECTION_LOG_INTERVAL_S, with the counts by reason since the last line."""
        self._rejections_unlogged[rejection.reason] += 1
        self._latest_rejection = rejection
        wait_s = REJECTION_LOG_INTERVAL_S - (time.monotonic() - self._rejection_logged_at)
        if wait_s <= 0:
            self.flush_rejection_log()
        elif self._rejection_flush is None:
            # A burst's later rejections are logged when the interval ends, even if no more come.
            self._rejection_flush = asyncio.get_running_loop().call_later(wait_s, self.flush_rejection_log)

    def flush_rejection_log(self) -> None:
        """Log the rejections not logged yet, if any."""
        if self._rejection_flush is not None:
            self._rejection_flush.cancel()
            self._rejection_flush = None
        latest = self._latest_rejection
        if latest is None or not self._rejections_unlogged:
            return
        reasons = ", ".join(f"{reason} {count}" for reason, count in self._rejections_unlogged.most_common())
        logger.info(
            "rejected %d new stream(s) since the last report (%s); the latest with %s: %s",
            sum(self._rejections_unlogged.values()),
            reasons,
            latest.code.name,
            latest.message,
        )
        self._rejections_unlogged.clear()
        self._rejection_logged_at = time.monotonic()

    def _admit(self, context: grpc.aio.ServicerContext) -> str | None:
        """Raise Rejection when a new stream must be rejected; return the client's rate-limit key."""
        admission = self._executor.config.admission
        pushback = admission.retry_pushback_ms
        if self.draining:
            raise Rejection(
                grpc.StatusCode.UNAVAILABLE,
                "the server is shutting down; open the stream on another replica",
                pushback,
                "draining",
            )

        # Capacity: the configured cap, the learned cap, the projected busy fraction, then the projected wait.
        if len(self.active_sessions) >= admission.max_streams:
            raise Rejection(
                grpc.StatusCode.UNAVAILABLE,
                f"the server has {len(self.active_sessions)} open streams, its admission.max_streams limit; "
                f"retry after {pushback} ms or on another replica",
                pushback,
                "max_streams",
            )
        learned = self.learned_max_streams()
        if learned is not None and len(self.active_sessions) >= learned:
            raise Rejection(
                grpc.StatusCode.UNAVAILABLE,
                f"the server has {len(self.active_sessions)} open streams, the most it has carried within its "
                f"admission.max_queue_wait_ms (a cap learned from load); retry after {pushback} ms or on another replica",
                pushback,
                "learned_max_streams",
            )
        busy = self.busy_projection() if admission.max_busy_fraction > 0 else None
        if busy is not None:
            open_streams = len(self.active_sessions)
            if busy.cold_start_limit is not None and open_streams >= busy.cold_start_limit:
                raise Rejection(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the server has {open_streams} open streams and has not yet measured what one costs, so it "
                    f"admits at most {busy.cold_start_limit} until it has (admission.max_busy_fraction); retry after "
                    f"{pushback} ms or on another replica",
                    pushback,
                    "busy",
                )
            if busy.projected > admission.max_busy_fraction:
                arriving = (
                    f" (including {busy.reserve:.3f} kept for the {busy.arrivals_per_s:.0f} new streams a second arriving)"
                    if busy.reserve > 0 and busy.projected > busy.measured
                    else ""
                )
                raise Rejection(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the server is near its limit: its event loop was busy {busy.measured:.3f} of the "
                    f"last second, and with {open_streams} streams open one more stream projects a busy fraction of "
                    f"{busy.projected:.3f}{arriving}, over its admission.max_busy_fraction of "
                    f"{admission.max_busy_fraction:g}; retry after {pushback} ms or on another replica",
                    pushback,
                    "busy",
                )
        if admission.max_queue_wait_ms > 0:
            wait_s, cause = self.projected_wait()
            wait_ms = wait_s * 1000.0
            if wait_ms > admission.max_queue_wait_ms:
                raise Rejection(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the server is overloaded: work would wait about {wait_ms:.0f} ms in its queues ({cause}), "
                    f"over its admission.max_queue_wait_ms of {admission.max_queue_wait_ms:g} ms; retry after "
                    f"{pushback} ms or on another replica",
                    pushback,
                    "queue_wait",
                )

        # The client's own quota.
        if self.rate_limiter is None:
            return None
        key = self.rate_limiter.client_key(context.invocation_metadata() or (), context.peer())
        wait_s = self.rate_limiter.admit_stream(key)
        if wait_s is not None:
            limits = self._executor.config.rate_limits
            # The message names the same whole milliseconds as grpc-retry-pushback-ms.
            wait_ms = max(1, math.ceil(wait_s * 1000))
            raise Rejection(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.rate_limiter.describe_client(key)} is over its rate of new streams "
                f"(rate_limits.streams_per_second = {limits.streams_per_second:g}); retry in {wait_ms} ms",
                wait_ms,
                "rate_limit",
            )
        return key

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        # The call's span, when tracing is on, is made here rather than by an
        # interceptor (see streaminfer.server.tracing).
        span = None
        if self.tracing is not None:
            span = self.tracing.start_stream_span(SERVICE_METHOD_STREAM, context.invocation_metadata(), context.peer())
        # The call's final status code name, for the metrics, the log and the span.
        outcome, message = "OK", ""
        try:
            # Written as an async generator, not with context.write(), so that
            # interceptors that wrap streaming handlers work with it.
            try:
                first = await anext(aiter(request_iterator), None)
            except DecodeError as error:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the first StreamRequest could not be parsed ({error}); send StreamConfig built from the streaminfer.v1 proto",
                )
            # Admission comes after the config is read: a client whose write is
            # still under way when the status arrives would see INTERNAL instead.
            try:
                client_key = self._admit(context)
            except Rejection as rejection:
                self.rejected[rejection.code.name] += 1
                metrics.STREAMS_REJECTED.labels(rejection.reason).inc()
                self._log_rejection(rejection)
                if rejection.pushback_ms is not None:
                    context.set_trailing_metadata((("grpc-retry-pushback-ms", str(rejection.pushback_ms)),))
                await context.abort(rejection.code, rejection.message)
            if first is None:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "the stream ended before its first message; send a StreamRequest with config first",
                )
            kind = first.WhichOneof("request")
            if kind != "config":
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the first StreamRequest must carry config, got {kind or 'an empty message'}; send StreamConfig first",
                )
            try:
                session = Session(self._executor, first.config, context.peer())
            except StreaminferError as error:
                await context.abort(error.code, str(error))

            if span is not None:
                span.set_attribute("streaminfer.stream_id", session.stream_id)
                session.trace_with(self.tracing, self.tracing.context_of(span))
            if client_key is not None and self._executor.config.rate_limits.chunks_per_second > 0:
                session.admit_chunk = functools.partial(self.rate_limiter.admit_chunk, client_key)
                session.rate_limited_client = (
                    f"{self.rate_limiter.describe_client(client_key)} "
                    f"(rate_limits.chunks_per_second = {self._executor.config.rate_limits.chunks_per_second:g})"
                )
            self.active_sessions[session] = context
            # This task's log lines, and its reader's, carry the stream id.
            logs.STREAM_ID.set(session.stream_id)
            metrics.STREAMS_STARTED.inc()
            session.handler_task = asyncio.current_task()
            logger.info(
                "stream %s started: peer %s, models %s, label %r",
                session.stream_id,
                context.peer(),
                ",".join(model.model for model in first.config.models),
                first.config.label,
            )
            session.start_reading(request_iterator)
            try:
                yield session.accepted_message()
                async for response in session.responses():
                    yield response
                if session.failure is not None and not session.aborting:
                    outcome = session.failure.code.name
                    await context.abort(session.failure.code, str(session.failure))
                if session.end_reason in _END_STATUS:
                    status, template = _END_STATUS[session.end_reason]
                    limits = self._executor.config.limits
                    outcome = status.name
                    await context.abort(
                        status, template.format(max_duration=limits.max_stream_duration_s, idle=limits.idle_timeout_s)
                    )
            except asyncio.CancelledError:
                # The call's deadline passed, the client cancelled or went away,
                # or the server gave up on a client that stopped reading.
                if session.aborting:
                    outcome = "RESOURCE_EXHAUSTED"
                else:
                    remaining = context.time_remaining()
                    outcome = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
                raise
            except GeneratorExit:
                outcome = "RESOURCE_EXHAUSTED" if session.aborting else "CANCELLED"
                raise
            finally:
                session.close()
                self.active_sessions.pop(session, None)
                metrics.STREAMS_ENDED.labels(outcome).inc()
                if session.end_reason in _END_STATUS:
                    logger.info(
                        "stream %s ended: %s (%s)", session.stream_id, outcome, pb.StreamEndReason.Name(session.end_reason)
                    )
                else:
                    logger.info("stream %s ended: %s", session.stream_id, outcome)
        except grpc.aio.AbortError:
            outcome = context.code().name if context.code() is not None else "UNKNOWN"
            message = context.details() or ""
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # A stream that was admitted has its precise outcome already.
            if outcome == "OK":
                outcome = "CANCELLED"
            raise
        except Exception as error:
            outcome, message = "UNKNOWN", f"{type(error).__name__}: {error}"
            raise
        finally:
            if span is not None:
                self.tracing.end_stream_span(span, outcome, message)

    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferResponse:
        code = "OK"
        try:
            return await self._infer(request, context)
        except grpc.aio.AbortError:
            code = context.code().name if context.code() is not None else "UNKNOWN"
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "UNKNOWN"
            raise
        finally:
            metrics.INFER_REQUESTS.labels(code).inc()

    async def _infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferResponse:
        runner = self._executor.runners.get(request.model)
        if runner is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model = {request.model!r} is not served; served models: {', '.join(self._executor.runners)}",
            )
        if self.draining:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the server is shutting down; send the request to another replica"
            )
        await self._limit_infer_rate(context)
        kind = request.WhichOneof("input")
        if kind == "tensor":
            return await self._infer_tensor(runner, request.tensor, context)
        modality = runner.model.info.modality
        expected = {pb.MODALITY_AUDIO: "audio_content", pb.MODALITY_VIDEO: "image_content", pb.MODALITY_TEXT: "text"}
        if kind != expected.get(modality, "tensor"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input = {kind or 'unset'} does not fit model {request.model!r}, which reads "
                f"{pb.Modality.Name(modality)}: set {expected.get(modality, 'tensor')}",
            )
        config = pb.StreamConfig(models=[pb.ModelSelection(model=request.model)])
        if request.HasField("audio_format"):
            config.audio_format.CopyFrom(request.audio_format)
        if request.HasField("video_format"):
            config.video_format.CopyFrom(request.video_format)
        try:
            session = Session(self._executor, config, context.peer())
        except StreaminferError as error:
            await context.abort(error.code, _infer_field_names(str(error)))

        try:
            await session.read(_one_shot_requests(request, kind, self._executor.config.limits.max_audio_chunk_bytes))
            response = pb.InferResponse()
            async for message in session.responses():
                response.results.extend(message.results)
                if message.errors:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _infer_field_names(message.errors[0].message))
            if session.failure is not None:
                await context.abort(session.failure.code, _infer_field_names(str(session.failure)))
            return response
        finally:
            session.close()

    async def _limit_infer_rate(self, context: grpc.aio.ServicerContext) -> None:
        """Take a chunk token for the caller: each Infer request counts as one chunk against its chunk rate.

        Aborts the call with RESOURCE_EXHAUSTED and a pushback when the client is over it.
        """
        limits = self._executor.config.rate_limits
        if self.rate_limiter is None or limits.chunks_per_second <= 0:
            return
        key = self.rate_limiter.client_key(context.invocation_metadata() or (), context.peer())
        wait_s = self.rate_limiter.chunk_wait_s(key)
        if wait_s is None:
            return
        wait_ms = max(1, math.ceil(wait_s * 1000))
        # Counted by streaminfer_infer_requests_total{code="RESOURCE_EXHAUSTED"}, not as a rejected stream.
        context.set_trailing_metadata((("grpc-retry-pushback-ms", str(wait_ms)),))
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{self.rate_limiter.describe_client(key)} is over its chunk rate "
            f"(rate_limits.chunks_per_second = {limits.chunks_per_second:g}), which each Infer request counts "
            f"against; retry in {wait_ms} ms",
        )

    async def _infer_tensor(
        self, runner: ModelRunner, tensor: pb.Tensor, context: grpc.aio.ServicerContext
    ) -> pb.InferResponse:
        """Run a user model on one raw tensor through its batcher."""
        input_from_tensor = getattr(runner.model, "input_from_tensor", None)
        if input_from_tensor is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input = tensor does not fit model {runner.config.name!r}: raw tensors go to user models only "
                "(kind torchscript or torch_export)",
            )
        try:
            model_input = await self._executor.decode.run(input_from_tensor, tensor)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

        owner = _OneShot(StreamOptions(stream_id=f"infer-{secrets.token_hex(4)}", interim_results=False))
        remaining = context.time_remaining()
        budget_s = self._executor.config.limits.chunk_latency_budget_ms / 1000.0
        deadline = math.inf
        if remaining is not None:
            deadline = time.monotonic() + remaining
        elif budget_s > 0:
            deadline = time.monotonic() + budget_s
        item = WorkItem(
            owner=owner,
            slot=None,
            model_input=model_input,
            index=0,
            inference_state=None,
            preprocess_state=None,
            deadline=deadline,
        )
        try:
            runner.submit([item])
            done = await owner.done
        except QueueFull as error:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"{error}; retry after {self._executor.config.admission.retry_pushback_ms} ms or on another replica",
            )
        finally:
            owner.closed = True
        if isinstance(done.error, ItemDropped):
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"model {runner.config.name!r}: {done.error.message}")
        if done.error is not None:
            await context.abort(
                grpc.StatusCode.INTERNAL, f"model {runner.config.name!r} failed: {type(done.error).__name__}: {done.error}"
            )
        for result in done.results:
            result.model = runner.config.name
            result.modality = runner.model.info.modality
        return pb.InferResponse(results=done.results)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._model_info(name) for name in self._executor.runners])

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.GetModelResponse:
        if request.name not in self._executor.runners:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"name = {request.name!r} is not a served model; served models: {', '.join(self._executor.runners)}",
            )
        return pb.GetModelResponse(model=self._model_info(request.name))

    def _model_info(self, name: str) -> pb.ModelInfo:
        runner = self._executor.runners[name]
        info = runner.model.info
        message = pb.ModelInfo(
            name=name,
            modality=info.modality,
            description=runner.config.description or info.description,
            stateful=info.stateful,
            max_batch_size=runner.config.batching.max_batch_size,
            device=runner.device,
            instances=runner.config.instances,
            labels=list(info.labels),
            healthy=name not in self.unhealthy_models,
        )
        set_duration(message.max_queue_delay, runner.config.batching.max_queue_delay_ms / 1000.0)
        if info.input_shape is not None:
            message.input.shape.extend(info.input_shape)
            data_type = DATA_TYPES.get(info.input_dtype or "")
            message.input.data_type = data_type.proto if data_type else pb.DATA_TYPE_UNSPECIFIED
        return message


# Infer runs its request as a one-chunk stream. Messages about the stream's
# fields name the InferRequest fields they came from instead.
_INFER_FIELD_NAMES = (
    ("config.audio_format", "audio_format"),
    ("config.video_format", "video_format"),
    ("audio.audio_content", "audio_content"),
    ("frame.image_content", "image_content"),
    ("text.text", "text"),
)


def _infer_field_names(message: str) -> str:
    """Return ``message`` with the StreamRequest field names it uses replaced by the InferRequest ones."""
    for stream_field, infer_field in _INFER_FIELD_NAMES:
        message = message.replace(stream_field, infer_field)
    return message


async def _one_shot_requests(request: pb.InferRequest, kind: str, max_chunk_bytes: int) -> AsyncIterator[pb.StreamRequest]:
    """Turn a unary request into stream messages, splitting long audio at the chunk limit."""
    if kind == "audio_content":
        content = request.audio_content
        frame_bytes = 4 if request.audio_format.encoding == pb.AUDIO_ENCODING_FLOAT32 else 2
        frame_bytes *= max(1, request.audio_format.audio_channel_count)
        step = max(frame_bytes, max_chunk_bytes - max_chunk_bytes % frame_bytes)
        for sequence_number, offset in enumerate(range(0, max(len(content), 1), step)):
            yield pb.StreamRequest(
                audio=pb.AudioChunk(sequence_number=sequence_number, audio_content=content[offset : offset + step])
            )
    elif kind == "image_content":
        yield pb.StreamRequest(frame=pb.VideoFrame(sequence_number=0, image_content=request.image_content))
    else:
        yield pb.StreamRequest(text=pb.TextChunk(sequence_number=0, text=request.text.encode()))


class _OneShot:
    """The owner of a single work item from a unary call."""

    def __init__(self, options: StreamOptions) -> None:
        self.closed = False
        self.options = options
        self.done: asyncio.Future[WorkItem] = asyncio.get_running_loop().create_future()

    def on_items_done(self, slot: object, items: list[WorkItem]) -> None:
        if not self.done.done():
            self.done.set_result(items[0])

