"""The server process: gRPC server, health, reflection and signal handling."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from streaminfer.server.config import ServerConfig
from streaminfer.server.executor import Executor
from streaminfer.server.service import InferenceService
from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name

# Allocations between young-generation collections (Python's default is 700).
GC_YOUNG_THRESHOLD = 50_000

# Room above the largest frame for the rest of the message.
_MESSAGE_OVERHEAD_BYTES = 64 * 1024


class BindError(Exception):
    """The server cannot listen on the configured address."""


class StreaminferServer:
    """Loads the models, then serves InferenceService with health and reflection."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.executor = Executor(config)
        self.health = health.aio.HealthServicer()
        self.service = InferenceService(self.executor)
        self.port = 0
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Bind the port, load the models, and start serving; return the bound port.

        The port is bound first, so a busy port fails before the models load.
        """
        max_message = self.config.limits.max_frame_bytes + _MESSAGE_OVERHEAD_BYTES
        self._server = grpc.aio.server(
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
            self.port = self._server.add_insecure_port(address)
        except RuntimeError as error:
            raise BindError(
                f"cannot listen on {address}: {error}; the port may be in use or the host not local. "
                "Pick another with --port (0 picks a free one) or --host"
            ) from error

        await self.executor.start()
        _tune_garbage_collector()
        pb_grpc.add_InferenceServiceServicer_to_server(self.service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        await self._server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info("streaminfer listening on %s:%d", self.config.host, self.port)
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking new calls, give running ones ``grace`` seconds, then free everything."""
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        await self.executor.aclose()
        logger.info("streaminfer stopped")

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
    config: ServerConfig, grace: float = 5.0, on_ready: Callable[[int], None] | None = None
) -> None:
    """Run a server until SIGINT or SIGTERM, then stop it within ``grace`` seconds.

    ``on_ready`` gets the bound port once the server listens; without it the
    port is printed to stdout.
    """
    server = StreaminferServer(config)
    await server.start()
    if on_ready is None:
        print(f"streaminfer listening on {config.host}:{server.port}", flush=True)
    else:
        on_ready(server.port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    logger.info("signal received; stopping with %.1f s grace", grace)
    await server.stop(grace)
