"""The server process: gRPC server, health, reflection and signal handling."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from streaminfer.server import metrics, priority, tracing
from streaminfer.server.access import ApiKeyInterceptor, RateLimiter, bucket_capacity, load_api_keys, server_credentials
from streaminfer.server.config import RateLimitConfig, ServerConfig
from streaminfer.server.executor import Executor
from streaminfer.server.load import LoadMonitor
from streaminfer.server.service import InferenceService
from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name

# Allocations between young-generation collections (Python's default is 700).
GC_YOUNG_THRESHOLD = 50_000

# After the drain grace: seconds ended streams get to send their final answers.
FINAL_ANSWER_S = 5.0
DRAIN_POLL_S = 0.05
# After draining, seconds left to calls other than streams (a unary Infer).
STOP_GRACE_S = 1.0
# Seconds between looks for gRPC threads started since the last one.
PRIORITY_CHECK_S = 5.0

# Room above the largest frame for the rest of the message.
_MESSAGE_OVERHEAD_BYTES = 64 * 1024


def describe_rate_limits(rates: RateLimitConfig, by_api_key: bool) -> str:
    """Return the rate limits as the start-up line names them, or "off"."""
    parts = [
        f"{unit} {rate:g}/s (burst {bucket_capacity(rate, burst):g})"
        for rate, burst, unit in (
            (rates.streams_per_second, rates.stream_burst, "new streams"),
            (rates.chunks_per_second, rates.chunk_burst, "chunks"),
        )
        if rate > 0
    ]
    if not parts:
        return "off"
    return f"{' and '.join(parts)} per {'API key' if by_api_key else 'client address'}"


class BindError(Exception):
    """The server cannot listen on the configured address."""


class StreaminferServer:
    """Loads the models, then serves InferenceService with health and reflection."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        # Read here, so that an unreadable key file fails before anything loads.
        self.api_keys = load_api_keys(config.auth)
        self.rate_limiter = RateLimiter(config.rate_limits, self.api_keys)
        self.executor = Executor(config)
        self.health = health.aio.HealthServicer()
        self.tracing = tracing.setup(config.tracing.chunk_sample_ratio)
        self.service = InferenceService(self.executor)
        self.service.tracing = self.tracing
        self.service.rate_limiter = self.rate_limiter
        self.monitor = LoadMonitor(self.executor, self.service, self._set_healthy)
        self.service.projected_wait = self.monitor.projected_wait
        self.service.learned_max_streams = lambda: self.monitor.learned_max_streams
        self.service.busy_projection = self.monitor.busy_projection
        self.service.unhealthy_models = self.monitor.unhealthy_models
        self.port = 0
        # The bound /metrics port; None when metrics are off.
        self.metrics_port: int | None = None
        self._metrics_server: Any = None
        self._server: grpc.aio.Server | None = None
        self.grpc_priority = priority.GrpcThreadPriority(config.grpc_thread_nice)
        self._priority_task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind the port, load the models, and start serving; return the bound port.

        The port is bound first, so a busy port fails before the models load.
        """
        max_message = self.config.limits.max_frame_bytes + _MESSAGE_OVERHEAD_BYTES
        credentials = server_credentials(self.config)
        interceptors: list[Any] = []
        if self.tracing is not None:
            # First, so that rejected calls are traced too.
            interceptors.append(self.tracing.server_interceptor())
        if self.api_keys:
            interceptors.append(ApiKeyInterceptor(self.api_keys))
        self._server = grpc.aio.server(
            interceptors=interceptors or None,
            options=[
                ("grpc.max_receive_message_length", max_message),
                ("grpc.max_send_message_length", max_message),
                # Accept client keepalive pings every 10 s or more, so clients
                # can detect dead connections on long quiet streams.
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.so_reuseport", 1 if self.config.reuse_port else 0),
            ]
        )
        address = f"{self.config.host}:{self.config.port}"
        if ":" in self.config.host and not self.config.host.startswith("["):
            address = f"[{self.config.host}]:{self.config.port}"
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, credentials)
        except RuntimeError as error:
            raise BindError(
                f"cannot listen on {address}: {error}; the port may be in use or the host not local. "
                "Pick another with --port (0 picks a free one) or --host"
            ) from error
        if self.config.metrics_port < 0 and not metrics.MULTIPROCESS:
            # Off means not recorded either. A worker's parent serves its
            # metrics (multiprocess mode), so a worker records them.
            metrics.disable()
        if self.config.metrics_port >= 0:
            try:
                self._metrics_server, self.metrics_port = metrics.start_server(
                    self.config.metrics_host or self.config.host, self.config.metrics_port
                )
            except OSError as error:
                raise BindError(str(error)) from error

        try:
            await self.executor.start()
        except BaseException:
            self._stop_metrics()
            raise
        # The monitor starts first: it decides whether the busy fraction is measured, which the metrics show.
        self.monitor.start()
        self.monitor.sampler = metrics.Sampler(self.executor, self.service, self.monitor)
        _tune_garbage_collector()
        pb_grpc.add_InferenceServiceServicer_to_server(self.service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        await self._server.start()
        self._lower_grpc_threads()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        admission = self.config.admission
        wait_check = f"{admission.max_queue_wait_ms:g} ms" if admission.max_queue_wait_ms > 0 else "off"
        busy_limit = self.monitor.busy_limit
        busy_check = f"{busy_limit:g}" if busy_limit > 0 else "off"
        rate_limits = describe_rate_limits(self.config.rate_limits, bool(self.api_keys))
        logger.info(
            "streaminfer listening on %s:%d (%s, API keys %s, rate limits %s, at most %d streams, "
            "shedding above a projected queue wait of %s and a projected busy fraction of %s, metrics %s)",
            self.config.host,
            self.port,
            "TLS" if self.config.tls_cert_file else "plaintext",
            "required" if self.api_keys else "off",
            rate_limits,
            admission.max_streams,
            wait_check,
            busy_check,
            f"on http://{self.config.metrics_host or self.config.host}:{self.metrics_port}/metrics"
            if self.metrics_port is not None
            else "off",
        )
        return self.port

    def _lower_grpc_threads(self) -> None:
        """Run gRPC's threads below the event loop's priority, now and every PRIORITY_CHECK_S."""
        lowering = self.grpc_priority
        if lowering.offset == 0:
            logger.info("gRPC's threads keep the event loop's priority (server.grpc_thread_nice = 0)")
            return
        if not priority.supported():
            logger.info("gRPC's threads keep the event loop's priority: thread priorities need Linux with /proc")
            return
        lowered = lowering.lower()
        if lowering.failed:
            return
        if not lowered:
            logger.warning(
                "found none of gRPC's threads by name (%s), so they keep the event loop's priority. "
                "Set server.grpc_thread_nice = 0 to skip the search",
                ", ".join(sorted(priority.GRPC_THREAD_NAMES)),
            )
            return
        assert lowering.target is not None and lowering.loop_nice is not None
        gap = lowering.target - lowering.loop_nice
        logger.info(
            "gRPC's %d I/O thread(s) run at nice %d, %d below the event loop's %d (server.grpc_thread_nice = %d%s)",
            lowered,
            lowering.target,
            gap,
            lowering.loop_nice,
            lowering.offset,
            "" if gap == lowering.offset else ", cut short because nice values stop at 19",
        )
        self._priority_task = asyncio.create_task(self._keep_grpc_threads_lowered(), name="grpc-thread-priority")

    async def _keep_grpc_threads_lowered(self) -> None:
        while self.grpc_priority.active:
            await asyncio.sleep(PRIORITY_CHECK_S)
            lowered = self.grpc_priority.lower()
            if lowered:
                logger.debug("lowered %d new gRPC thread(s) to nice %d", lowered, self.grpc_priority.target)

    async def _set_healthy(self, healthy: bool) -> None:
        self.service.unhealthy_models = self.monitor.unhealthy_models
        if self.service.draining:
            return
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def drain(self, grace: float) -> None:
        """Stop admitting streams, let running ones go on for ``grace`` seconds, then end them.

        Health turns NOT_SERVING at once and new streams get UNAVAILABLE.
        Streams still open after ``grace`` are ended by the server: it stops
        reading them, answers every chunk it read and sends StreamEnd with
        reason DRAINING. Returns when every stream has ended, or
        ``FINAL_ANSWER_S`` after that.
        """
        loop = asyncio.get_running_loop()
        self.service.draining = True
        await self.health.enter_graceful_shutdown()
        logger.info("draining: %d open stream(s), %.1f s grace", len(self.service.active_sessions), grace)
        deadline = loop.time() + grace
        while self.service.active_sessions and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if self.service.active_sessions:
            logger.info("draining: ending %d stream(s) after the grace period", len(self.service.active_sessions))
            for session in list(self.service.active_sessions):
                if session.end_by_server(pb.STREAM_END_REASON_DRAINING):
                    self.monitor.ended_by_server("draining")
            deadline = loop.time() + FINAL_ANSWER_S
            while self.service.active_sessions and loop.time() < deadline:
                await asyncio.sleep(DRAIN_POLL_S)
        logger.info("draining: done, %d stream(s) left", len(self.service.active_sessions))

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking new calls, give running ones ``grace`` seconds, then free everything."""
        self.service.draining = True
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        if self._priority_task is not None:
            self._priority_task.cancel()
        await self.monitor.aclose()
        self.service.flush_rejection_log()
        await self.executor.aclose()
        self._stop_metrics()
        if self.tracing is not None:
            # Sends the spans still buffered.
            await asyncio.to_thread(self.tracing.shutdown)
        logger.info("streaminfer stopped")

    def _stop_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


def _tune_garbage_collector() -> None:
    """Keep the cyclic collector off the hot path.

    The loaded models leave millions of long-lived objects behind, and every
    chunk allocates short-lived ones, so the default thresholds run full
    collections over the model objects many times a second (seen with
    py-spy at 200 streams). Freezing moves what exists now out of the
    collector's view; the larger first threshold makes young collections rarer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)


async def serve(
    config: ServerConfig,
    on_ready: Callable[[int], None] | None = None,
    signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM),
) -> int:
    """Run a server until SIGINT or SIGTERM, drain it, and return the exit status.

    The first signal drains (see ``StreaminferServer.drain``, with
    ``config.drain_grace_s``) and the process then exits with 0; a second
    signal stops at once, cancelling what runs, with 1. ``on_ready`` gets the
    bound port once the server listens; without it the port is printed to
    stdout.
    """
    server = StreaminferServer(config)
    await server.start()
    # Install the handlers before the ready line: a supervisor that reads it may send SIGTERM at once.
    received = asyncio.Queue[int]()
    loop = asyncio.get_running_loop()
    for signum in signals:
        loop.add_signal_handler(signum, received.put_nowait, signum)
    if on_ready is None:
        print(f"streaminfer listening on {config.host}:{server.port}", flush=True)
        if server.metrics_port is not None:
            print(f"streaminfer metrics on http://{config.metrics_host or config.host}:{server.metrics_port}/metrics", flush=True)
    else:
        on_ready(server.port)
    signum = await received.get()
    logger.info("%s received; draining for up to %.1f s", signal.Signals(signum).name, config.drain_grace_s)
    drain = asyncio.create_task(server.drain(config.drain_grace_s))
    second = asyncio.create_task(received.get())
    await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
    if second.done():
        logger.warning("second signal received; stopping now")
        drain.cancel()
        await server.stop(grace=0)
        return 1
    second.cancel()
    await server.stop(grace=STOP_GRACE_S)
    return 0
