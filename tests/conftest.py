"""Shared fixtures: a real server on a loopback port, with the real models."""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
import threading
from collections.abc import Iterator

import grpc
import pytest
import uvloop

from streaminfer.server.app import StreaminferServer
from streaminfer.server.config import ServerConfig, load_config

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
MEDIA = REPO_ROOT / "media"


class ServerThread:
    """A StreaminferServer running on its own event loop in a background thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server: StreaminferServer | None = None
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-server", daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._started.wait(timeout=300):
            raise TimeoutError("server did not start within 300 s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        uvloop.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.server = StreaminferServer(self.config)
            self.port = await self.server.start()
        except BaseException as error:
            self._error = error
            self._started.set()
            raise
        self._started.set()
        await self._stop.wait()
        await self.server.stop(grace=1.0)


def loopback_config(config: ServerConfig | None = None) -> ServerConfig:
    """Return ``config`` (default: the built-in one) bound to a free loopback port, with metrics on a free port too."""
    return dataclasses.replace(config or load_config(None), host="127.0.0.1", port=0, metrics_port=0)


@pytest.fixture(scope="session")
def server() -> Iterator[ServerThread]:
    thread = ServerThread(loopback_config()).start()
    yield thread
    thread.stop()


@pytest.fixture
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel
