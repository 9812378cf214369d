"""The blocking client: ``AsyncClient`` run on a private event loop thread.

Every method hands a coroutine of the async client to that loop and waits for
its outcome, so both clients share one implementation. The methods may be
called from several threads at once, for example one sending audio, one
sending video and one reading events.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import grpc

from streaminfer.client._client import AsyncClient
from streaminfer.client._config import AudioFormat, Modality, VideoFormat
from streaminfer.client._events import Result, StreamEvent
from streaminfer.client._options import DEFAULT_TARGET, ClientOptions
from streaminfer.client._retry import RetryPolicy
from streaminfer.client._session import StreamSession, StreamState
from streaminfer.client._tracker import StreamStats
from streaminfer.v1 import streaminfer_pb2 as pb

__all__ = ["SyncClient", "SyncStream"]

_T = TypeVar("_T")


class _LoopThread:
    """An event loop running on its own daemon thread until ``close``."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        # Daemon, so a client that is never closed cannot keep the process alive.
        self._thread = threading.Thread(target=self._run_loop, name="streaminfer-client-loop", daemon=True)
        self._thread.start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coroutine`` on the loop and return its result; cancel it if the caller is interrupted."""
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("a SyncClient method was called from its own event loop thread; use AsyncClient there")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            # KeyboardInterrupt in the waiting thread cancels the work on the loop too.
            future.cancel()
            raise

    @property
    def closed(self) -> bool:
        return self._loop.is_closed()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


class SyncStream:
    """The blocking view of a ``StreamSession``; see that class for the semantics."""

    def __init__(self, session: StreamSession, loop: _LoopThread) -> None:
        self._session = session
        self._loop = loop

    @property
    def stream_id(self) -> str:
        return self._session.stream_id

    @property
    def roll_over(self) -> bool:
        return self._session.roll_over

    @property
    def accepted(self) -> pb.SessionAccepted:
        return self._session.accepted

    @property
    def limits(self) -> pb.StreamLimits:
        return self._session.limits

    @property
    def state(self) -> StreamState:
        return self._session.state

    @property
    def stats(self) -> StreamStats:
        """Counts and latencies; updated by the loop thread, complete once the stream has closed."""
        return self._session.stats

    @property
    def in_flight(self) -> int:
        return self._session.in_flight

    @property
    def max_chunks_in_flight(self) -> int:
        return self._session.max_chunks_in_flight

    @property
    def stream_end(self) -> pb.StreamEnd | None:
        return self._session.stream_end

    def outstanding(self, modality: Modality) -> list[int]:
        # Read on the loop thread, which is the only writer of that table.
        return self._loop.run(_call_on_loop(self._session.outstanding, modality))

    def send_audio(self, content: bytes, timestamp: float | None = None) -> int:
        return self._loop.run(self._session.send_audio(content, timestamp))

    def send_frame(self, content: bytes, timestamp: float | None = None) -> int:
        return self._loop.run(self._session.send_frame(content, timestamp))

    def send_text(self, text: str | bytes, timestamp: float | None = None) -> int:
        return self._loop.run(self._session.send_text(text, timestamp))

    def flush(self, modality: Modality | str | int | None = None) -> None:
        self._loop.run(self._session.flush(modality))

    def end_input(self) -> None:
        self._loop.run(self._session.end_input())

    def next_event(self) -> StreamEvent | None:
        return self._loop.run(self._session.next_event())

    def __iter__(self) -> Iterator[StreamEvent]:
        while (event := self.next_event()) is not None:
            yield event

    def results(self) -> Iterator[Result]:
        """Yield only the results, consuming and dropping the other events."""
        for event in self:
            if isinstance(event, Result):
                yield event

    def close(self) -> None:
        self._loop.run(self._session.aclose())

    def __enter__(self) -> SyncStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SyncClient:
    """A blocking client of one streaminfer server; see ``AsyncClient`` for the semantics.

    Use it as ``with SyncClient("127.0.0.1:50051") as client``, or call ``close()``,
    which also stops the client's event loop thread.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        options: ClientOptions | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        # Built first, so that invalid arguments start no thread.
        self._client = AsyncClient(
            target, options=options, credentials=credentials, api_key=api_key, retry_policy=retry_policy
        )
        self._loop = _LoopThread()

    @property
    def target(self) -> str:
        return self._client.target

    @property
    def options(self) -> ClientOptions:
        return self._client.options

    @property
    def retry_policy(self) -> RetryPolicy:
        return self._client.retry_policy

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel and stop the event loop thread. Safe to call twice."""
        try:
            if not self._loop.closed:
                self._loop.run(self._client.close())
        finally:
            self._loop.close()

    def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        return self._loop.run(self._client.list_models(timeout=timeout))

    def get_model(self, name: str, *, timeout: float | None = None) -> pb.ModelInfo:
        return self._loop.run(self._client.get_model(name, timeout=timeout))

    def infer(
        self,
        model: str,
        *,
        text: str | None = None,
        audio: bytes | None = None,
        audio_format: AudioFormat | None = None,
        image: bytes | None = None,
        video_format: VideoFormat | None = None,
        tensor: pb.Tensor | None = None,
        timeout: float | None = None,
    ) -> list[pb.StreamResult]:
        return self._loop.run(
            self._client.infer(
                model,
                text=text,
                audio=audio,
                audio_format=audio_format,
                image=image,
                video_format=video_format,
                tensor=tensor,
                timeout=timeout,
            )
        )

    def open_stream(
        self,
        config: pb.StreamConfig,
        *,
        timeout: float | None = None,
        max_chunks_in_flight: int | None = None,
        roll_over: bool = False,
    ) -> SyncStream:
        session = self._loop.run(
            self._client.open_stream(
                config, timeout=timeout, max_chunks_in_flight=max_chunks_in_flight, roll_over=roll_over
            )
        )
        return SyncStream(session, self._loop)


async def _call_on_loop(function: Callable[..., _T], *args: Any) -> _T:
    return function(*args)
