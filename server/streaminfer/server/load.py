"""How far behind the server is, and the timers that end streams and flag hung models.

LoadMonitor runs on the event loop. Every tick it measures the loop's lag: how
late a timer fires, which is how long any message waits before the loop
handles it. The projected queue wait of a new stream is the largest of four
measures: the loop lag, the decode backlog, each model's queued batches times
its batch time, and the median audio backlog. The audio backlog is how far the
server reads real-time audio streams behind the pace their clients send at.
Admission control compares the projection with its budget.

Every ``CHECK_INTERVAL_S`` it also ends streams that passed a time limit
(idle, maximum duration), aborts streams whose client stopped reading
results, and marks a model unhealthy while one of its batches has run longer
than the hang timeout.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc

from streaminfer.server import metrics
from streaminfer.v1 import streaminfer_pb2 as pb

if TYPE_CHECKING:
    from streaminfer.server.executor import Executor
    from streaminfer.server.service import InferenceService

logger = logging.getLogger(__name__)

TICK_S = 0.02
# Learned stream cap: checks in a row under CALM_FRACTION of the budget that
# make the stream count calm, the calm seconds at the cap before it rises, and by how much.
CALM_CHECKS = 4
# A check is calm while the projected wait is under this fraction of the budget.
CALM_FRACTION = 0.5
PROBE_AFTER_S = 10.0
PROBE_STEP = 0.05
CHECK_INTERVAL_S = 0.25
# Loop lag is the largest of the last this many ticks (about one second).
LAG_WINDOW_TICKS = 50


class LoadMonitor:
    def __init__(
        self,
        executor: Executor,
        service: InferenceService,
        on_health_change: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self._executor = executor
        self._service = service
        self._limits = executor.config.limits
        self._on_health_change = on_health_change
        self._lags: collections.deque[float] = collections.deque(maxlen=LAG_WINDOW_TICKS)
        self._task: asyncio.Task[None] | None = None
        self.unhealthy_models: set[str] = set()
        # Median audio backlog of the open streams, seconds; see _measure_audio_backlog.
        self.audio_backlog_s = 0.0
        # The learned stream cap (admission.learn_max_streams), None until the first overload.
        self.learned_max_streams: int | None = None
        self._calm_streams = 0
        self._calm_checks = 0
        self._calm_since = 0.0
        self.streams_ended = collections.Counter[str]()
        # Sets the sampled metrics; the server installs it once the models are loaded.
        self.sampler: metrics.Sampler | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="load-monitor")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def loop_lag_s(self) -> float:
        return max(self._lags, default=0.0)

    def decode_wait_s(self) -> float:
        decode = self._executor.decode
        stats = decode.stats
        if not stats.jobs:
            return 0.0
        return decode.queue_depth * (stats.busy_seconds / stats.jobs) / decode.lanes

    def projected_wait_s(self) -> float:
        """Seconds a chunk of a new stream would wait in queues before inference starts."""
        return self._largest_wait()[0]

    def projected_wait(self) -> tuple[float, str]:
        """Return the projected wait in seconds and what it comes from, in words."""
        wait_s, source = self._largest_wait()
        if source == "loop":
            return wait_s, "event-loop lag"
        if source == "decode":
            return wait_s, f"decode backlog of {self._executor.decode.queue_depth} hand-off(s)"
        if source == "audio":
            return wait_s, "audio read behind the clients' pace"
        return wait_s, f"model {source}: {self._executor.runners[source].queue_depth} item(s) queued"

    def _largest_wait(self) -> tuple[float, str]:
        """Return the largest of the wait measures and its source: loop, decode, audio or a model name."""
        measures = [(self.loop_lag_s(), "loop"), (self.decode_wait_s(), "decode"), (self.audio_backlog_s, "audio")]
        measures += [(runner.projected_wait_s(), name) for name, runner in self._executor.runners.items()]
        return max(measures, key=lambda measure: measure[0])

    def _measure_audio_backlog(self) -> None:
        """Take the median over streams of how far their audio is read behind the client's pace.

        It measures a wait the queues miss: when the process runs out of CPU,
        chunks wait in sockets and HTTP/2 buffers before the server reads them.
        """
        now = time.monotonic()
        backlogs = sorted(
            backlog
            for session in self._service.active_sessions
            if (backlog := session.audio_backlog_s(now)) is not None
        )
        self.audio_backlog_s = backlogs[len(backlogs) // 2] if backlogs else 0.0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_check = loop.time() + CHECK_INTERVAL_S
        while True:
            expected = loop.time() + TICK_S
            await asyncio.sleep(TICK_S)
            now = loop.time()
            lag = max(0.0, now - expected)
            self._lags.append(lag)
            metrics.LOOP_LAG.observe(lag)
            if now >= next_check:
                next_check = now + CHECK_INTERVAL_S
                try:
                    self._measure_audio_backlog()
                    self._learn_max_streams(now)
                    self._check_streams()
                    await self._check_models()
                    if self.sampler is not None:
                        self.sampler.sample()
                except Exception:
                    logger.exception("load monitor check failed")

    def _learn_max_streams(self, now: float) -> None:
        """Update the learned stream cap from the projected wait and the open stream count."""
        admission = self._executor.config.admission
        if not admission.learn_max_streams or admission.max_queue_wait_ms <= 0:
            return
        budget_s = admission.max_queue_wait_ms / 1000.0
        wait_s = self.projected_wait_s()
        streams = len(self._service.active_sessions)

        # Overloaded: lower the cap to the most streams carried calmly.
        if wait_s > budget_s:
            self._calm_checks = 0
            self._calm_since = now
            # Without a calm count yet, the cap is what runs now: no more.
            cap = self._calm_streams or max(1, streams)
            if self.learned_max_streams is None or cap < self.learned_max_streams:
                logger.warning(
                    "projected wait %.0f ms with %d streams is over admission.max_queue_wait_ms; "
                    "capping new streams at %d, the most carried within half of it",
                    wait_s * 1000,
                    streams,
                    cap,
                )
                self.learned_max_streams = cap
            # From here on, only counts seen after this overload are calm ones.
            self._calm_streams = 0
            return

        # Busy but within the budget: neither calm nor overloaded.
        if wait_s > budget_s * CALM_FRACTION:
            self._calm_checks = 0
            self._calm_since = now
            return

        # Calm: count the streams carried, and probe above the cap after a calm spell at it.
        self._calm_checks += 1
        if self._calm_checks >= CALM_CHECKS:
            self._calm_streams = max(self._calm_streams, streams)
        cap = self.learned_max_streams
        if cap is not None and streams >= cap and now - self._calm_since >= PROBE_AFTER_S:
            self.learned_max_streams = cap + max(1, round(cap * PROBE_STEP))
            self._calm_since = now
            logger.info("calm at the learned cap of %d streams; raising it to %d", cap, self.learned_max_streams)

    def _check_streams(self) -> None:
        limits = self._limits
        now = time.monotonic()
        for session, context in list(self._service.active_sessions.items()):
            if session.closed:
                continue
            write_started = session.write_started_at
            if write_started is not None and now - write_started > limits.write_timeout_s:
                if session.aborting:
                    continue
                session.aborting = True
                self.ended_by_server("write_timeout")
                logger.warning(
                    "stream %s: the client has not read a response for %.1f s; ending the stream",
                    session.stream_id,
                    now - write_started,
                )
                asyncio.create_task(
                    _abort(
                        context,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the client did not read a response for {limits.write_timeout_s:g} s "
                        "(server limits.write_timeout_s), so the server ended the stream and freed its work; "
                        "read responses as they arrive",
                        limits.write_timeout_s,
                    )
                )
                # The status waits behind the unread messages, and so does the
                # handler's write. Cancelling the handler after the abort has
                # started frees the stream now; the client gets the status once
                # it reads again.
                if session.handler_task is not None:
                    asyncio.get_running_loop().call_soon(session.handler_task.cancel)
            elif limits.max_stream_duration_s and now - session.started_at > limits.max_stream_duration_s:
                if session.end_by_server(pb.STREAM_END_REASON_MAX_DURATION):
                    self.ended_by_server("max_duration")
            elif limits.idle_timeout_s and session.is_idle(now, limits.idle_timeout_s):
                if session.end_by_server(pb.STREAM_END_REASON_IDLE_TIMEOUT):
                    self.ended_by_server("idle_timeout")

    def ended_by_server(self, reason: str) -> None:
        """Count a stream the server ended itself: write_timeout, max_duration, idle_timeout or draining."""
        self.streams_ended[reason] += 1
        metrics.STREAMS_ENDED_BY_SERVER.labels(reason).inc()

    async def _check_models(self) -> None:
        hung = {
            name
            for name, runner in self._executor.runners.items()
            if runner.longest_running_s() > self._limits.model_hang_timeout_s
        }
        if hung == self.unhealthy_models:
            return
        for name in hung - self.unhealthy_models:
            logger.error(
                "model %s: a batch has run for over %.1f s (limits.model_hang_timeout_s); marking the server unhealthy",
                name,
                self._limits.model_hang_timeout_s,
            )
        for name in self.unhealthy_models - hung:
            logger.warning("model %s: the long batch finished; healthy again", name)
        was_healthy = not self.unhealthy_models
        self.unhealthy_models = hung
        if self._on_health_change is not None and was_healthy != (not hung):
            await self._on_health_change(not hung)


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str, timeout_s: float) -> None:
    """Send a status to a call from outside its handler, waiting at most ``timeout_s`` for it to go out."""
    try:
        await asyncio.wait_for(context.abort(code, details), timeout_s)
    except (grpc.aio.AbortError, TimeoutError):
        # abort() raises AbortError in the calling task by design. A client
        # that still reads nothing keeps the status from going out.
        pass
    except Exception as error:
        # The call ended first, for example because the client went away.
        logger.info("the %s status could not be sent: %s", code.name, error)
