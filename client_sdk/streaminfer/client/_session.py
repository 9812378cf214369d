"""The client side of one ``InferenceService.Stream`` call.

A session owns the call and one reader task. Senders number their chunks per
modality and wait for credit in the server's in-flight window. The reader
settles chunks as acks and errors arrive, so credit comes free even when no
one consumes the events.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc
from google.protobuf import duration_pb2

from streaminfer.client._config import Modality
from streaminfer.client._errors import RpcError, StreaminferError, StreamStateError, error_from_rpc_error
from streaminfer.client._events import ChunkFailed, ChunksAcked, Result, StreamEnded, StreamEvent
from streaminfer.client._tracker import ChunkTracker, StreamStats
from streaminfer.v1 import streaminfer_pb2 as pb

__all__ = ["StreamCall", "StreamSession", "StreamState"]

logger = logging.getLogger(__name__)


class StreamCall(Protocol):
    """The part of ``grpc.aio.StreamStreamCall`` a session uses; tests pass a fake."""

    async def write(self, request: pb.StreamRequest) -> None: ...

    async def done_writing(self) -> None: ...

    async def read(self) -> object: ...

    def cancel(self) -> bool: ...


class StreamState(enum.Enum):
    """Life-cycle state of a session."""

    # Chunks and control messages may be sent.
    OPEN = "open"
    # end_input was called; results of chunks already sent still arrive.
    INPUT_ENDED = "input_ended"
    # The call is over: ended by the server, failed, or closed by the client.
    CLOSED = "closed"


class _Closed:
    """Queue item after the last event; carries the error that ended the call, if any."""

    def __init__(self, error: StreaminferError | None) -> None:
        self.error = error


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


class StreamSession:
    """An open stream: send chunks, iterate over events.

    Create one with ``AsyncClient.open_stream``. ``async for event in session``
    yields ``Result``, ``ChunksAcked``, ``ChunkFailed`` and finally
    ``StreamEnded``. Send methods wait while ``max_chunks_in_flight`` chunks
    are unanswered. Events queue up in memory until they are consumed, so a
    long stream should be iterated while it runs.
    """

    def __init__(
        self,
        call: StreamCall,
        accepted: pb.SessionAccepted,
        *,
        max_chunks_in_flight: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        window = accepted.limits.max_chunks_in_flight
        if max_chunks_in_flight is not None:
            window = max_chunks_in_flight if window == 0 else min(window, max_chunks_in_flight)
        if window == 0:
            # NOTE: a server that reports no window gets no client-side limit;
            # HTTP/2 flow control is then the only backpressure.
            logger.warning(
                "stream %s: server sent no max_chunks_in_flight; sending without a window", accepted.stream_id
            )

        self.accepted = accepted
        self._call = call
        self._clock = clock
        self._tracker = ChunkTracker(window)
        self._state = StreamState.OPEN
        self._error: StreaminferError | None = None
        self._end: pb.StreamEnd | None = None
        # Set whenever credit may have come free or the state changed; each
        # waiter re-checks its condition after waking.
        self._credit_changed = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._events: asyncio.Queue[StreamEvent | _Closed] = asyncio.Queue()
        self._events_done = False
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        call: StreamCall,
        config: pb.StreamConfig,
        *,
        max_chunks_in_flight: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> StreamSession:
        """Send ``config``, wait for ``SessionAccepted`` and start reading.

        Raises the SDK error for the server's status when it rejects the config.
        """
        try:
            await call.write(pb.StreamRequest(config=config))
            response = await call.read()
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc_error(error) from error

        if response is grpc.aio.EOF:
            raise RpcError("the server ended the stream without SessionAccepted", grpc.StatusCode.INTERNAL)
        assert isinstance(response, pb.StreamResponse)
        if not response.HasField("session_accepted"):
            raise RpcError(
                "the server's first message has no session_accepted; is the server a streaminfer.v1 server?",
                grpc.StatusCode.INTERNAL,
            )

        session = cls(call, response.session_accepted, max_chunks_in_flight=max_chunks_in_flight, clock=clock)
        logger.debug(
            "stream %s: accepted, window %d chunks", session.stream_id, session._tracker.max_in_flight
        )
        # The first message may already carry more than the acceptance.
        session._handle(response)
        session._reader = asyncio.create_task(session._read_responses(), name=f"streaminfer-read-{session.stream_id}")
        return session

    # Properties

    @property
    def stream_id(self) -> str:
        return self.accepted.stream_id

    @property
    def limits(self) -> pb.StreamLimits:
        return self.accepted.limits

    @property
    def state(self) -> StreamState:
        return self._state

    @property
    def stats(self) -> StreamStats:
        """Live counts and latencies; complete once the stream has closed."""
        return self._tracker.stats

    @property
    def in_flight(self) -> int:
        """Chunks sent or being sent and not yet answered."""
        return self._tracker.in_flight

    @property
    def max_chunks_in_flight(self) -> int:
        """The window the session keeps to; 0 for none."""
        return self._tracker.max_in_flight

    @property
    def stream_end(self) -> pb.StreamEnd | None:
        """The server's ``StreamEnd``, once received."""
        return self._end

    def outstanding(self, modality: Modality) -> list[int]:
        """Return the sequence numbers of the modality's chunks not yet answered."""
        return self._tracker.outstanding(modality)

    # Sending

    async def send_audio(self, content: bytes, timestamp: float | None = None) -> int:
        """Send audio samples in the stream's audio format; return the chunk's sequence number.

        ``timestamp`` is the media time of the first sample, in seconds.
        """
        return await self._send_chunk(
            Modality.AUDIO,
            lambda number: pb.StreamRequest(
                audio=pb.AudioChunk(
                    sequence_number=number, timestamp=_optional_duration(timestamp), audio_content=content
                )
            ),
        )

    async def send_frame(self, content: bytes, timestamp: float | None = None) -> int:
        """Send one picture in the stream's video format; return the frame's sequence number.

        ``timestamp`` is the frame's media time, in seconds. Raises ValueError
        for a frame over the stream's ``max_frame_bytes``.
        """
        self._check_frame_size(len(content))
        return await self._send_chunk(
            Modality.VIDEO,
            lambda number: pb.StreamRequest(
                frame=pb.VideoFrame(
                    sequence_number=number, timestamp=_optional_duration(timestamp), image_content=content
                )
            ),
        )

    async def send_text(self, text: str | bytes, timestamp: float | None = None) -> int:
        """Send the next piece of text; return its sequence number.

        A ``str`` is encoded as UTF-8. A piece may end inside a sentence or word.
        """
        data = text.encode("utf-8") if isinstance(text, str) else text
        return await self._send_chunk(
            Modality.TEXT,
            lambda number: pb.StreamRequest(
                text=pb.TextChunk(sequence_number=number, timestamp=_optional_duration(timestamp), text=data)
            ),
        )

    async def flush(self, modality: Modality | str | int | None = None) -> None:
        """Ask the server to finish buffered work of ``modality`` now, or of every modality for None.

        It closes an open speech segment and embeds a partial sentence. A flush
        is not a chunk, so it needs no window credit and can unblock a window
        full of chunks that wait for more input. ``modality`` takes the forms
        ``Modality.parse`` accepts, for example ``"audio"``.
        """
        selected = Modality.UNSPECIFIED if modality is None else Modality.parse(modality)
        self._require_state(StreamState.OPEN, "flush")
        request = pb.StreamRequest(
            control=pb.StreamControl(action=pb.CONTROL_ACTION_FLUSH, modality=int(selected))
        )
        async with self._write_lock:
            self._require_state(StreamState.OPEN, "flush")
            await self._write(request)

    async def end_input(self) -> None:
        """Half-close the call: no more input follows. Events keep arriving until ``StreamEnded``."""
        self._require_state(StreamState.OPEN, "end_input")
        self._state = StreamState.INPUT_ENDED
        self._credit_changed.set()

        # Writes already holding or queued on the lock finish first.
        async with self._write_lock:
            try:
                await self._call.done_writing()
            except grpc.aio.AioRpcError as error:
                raise error_from_rpc_error(error) from error

    def _check_frame_size(self, size: int) -> None:
        # The server's gRPC message limit is about max_frame_bytes, so a larger
        # frame would fail the whole call instead of getting a ChunkError. It
        # is rejected here, before it takes a sequence number. Oversized audio
        # and text chunks still fit in a message and get TOO_LARGE errors.
        limit = self.limits.max_frame_bytes
        if limit > 0 and size > limit:
            raise ValueError(
                f"frame of {size} bytes is over the stream's max_frame_bytes of {limit} bytes: "
                "lower the resolution or the JPEG quality"
            )

    async def _send_chunk(self, modality: Modality, build: Callable[[int], pb.StreamRequest]) -> int:
        self._require_state(StreamState.OPEN, f"send {modality.label}")

        # 1. Wait for window credit, then take a sequence number.
        while self._state is StreamState.OPEN and not self._tracker.has_credit:
            self._credit_changed.clear()
            await self._credit_changed.wait()
        self._require_state(StreamState.OPEN, f"send {modality.label}")
        number = self._tracker.reserve(modality)

        # 2. Write in reservation order. Nothing between reserve() and the lock
        # request below yields to the event loop, and asyncio.Lock serves
        # waiters first in, first out, so numbers reach the wire increasing.
        written = False
        try:
            async with self._write_lock:
                # A chunk reserved before end_input is still written: end_input
                # queues behind it on the lock. Only a closed call stops it.
                if self._state is StreamState.CLOSED:
                    self._require_state(StreamState.OPEN, f"send {modality.label}")
                self._tracker.mark_sent(modality, number, self._clock())
                written = True
                await self._write(build(number))
        finally:
            if not written:
                self._tracker.cancel(modality, number)
                self._credit_changed.set()
        return number

    async def _write(self, request: pb.StreamRequest) -> None:
        try:
            await self._call.write(request)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc_error(error) from error
        except asyncio.InvalidStateError:
            # The call finished under us; the reader has or will have the reason.
            if self._reader is not None:
                await asyncio.wait({self._reader})
            self._require_state(StreamState.OPEN, "write")
            raise
        except asyncio.CancelledError:
            # grpc raises CancelledError in a write when the call, not this
            # task, was cancelled by aclose; report that as a state error.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            self._require_state(StreamState.OPEN, "write")
            raise

    def _require_state(self, expected: StreamState, action: str) -> None:
        if self._state is expected:
            return
        if self._error is not None:
            raise self._error
        raise StreamStateError(f"cannot {action}: expected stream state {expected.value}, got {self._state.value}")

    # Receiving

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self

    async def __anext__(self) -> StreamEvent:
        event = await self.next_event()
        if event is None:
            raise StopAsyncIteration
        return event

    async def next_event(self) -> StreamEvent | None:
        """Return the next event, or None after the last one.

        Raises the SDK error once if the call failed; later calls return None.
        """
        if self._events_done:
            return None
        item = await self._events.get()
        if isinstance(item, _Closed):
            self._events_done = True
            if item.error is not None:
                raise item.error
            return None
        return item

    async def results(self) -> AsyncIterator[Result]:
        """Yield only the results, consuming and dropping the other events."""
        async for event in self:
            if isinstance(event, Result):
                yield event

    async def _read_responses(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    break
                assert isinstance(response, pb.StreamResponse)
                self._handle(response)
        except grpc.aio.AioRpcError as rpc_error:
            error = error_from_rpc_error(rpc_error)
            logger.debug("stream %s: call failed: %s", self.stream_id, error)
            self._close(error)
        except asyncio.CancelledError:
            self._close(None, by_client=True)
            raise
        else:
            self._close(None)

    def _handle(self, response: pb.StreamResponse) -> None:
        now = self._clock()
        events: list[StreamEvent] = []

        for result in response.results:
            self._tracker.stats.results_by_model[result.model] += 1
            events.append(Result(result))
        for ack in response.acks:
            modality = Modality(ack.modality)
            settled = self._tracker.ack(modality, ack.first_sequence_number, ack.last_sequence_number, now)
            events.append(ChunksAcked(ack, tuple(settled)))
        for chunk_error in response.errors:
            modality = Modality(chunk_error.modality)
            reason = pb.ChunkErrorReason.Name(chunk_error.reason).removeprefix("CHUNK_ERROR_REASON_")
            latency = self._tracker.fail(modality, chunk_error.sequence_number, reason, now)
            events.append(ChunkFailed(chunk_error, latency))
        if response.HasField("stream_end"):
            self._end = response.stream_end
            events.append(StreamEnded(response.stream_end))

        if response.acks or response.errors:
            self._credit_changed.set()
        for event in events:
            self._events.put_nowait(event)

    def _close(self, error: StreaminferError | None, *, by_client: bool = False) -> None:
        if self._state is StreamState.CLOSED:
            return
        if error is None and self._end is None and not by_client:
            logger.warning("stream %s: the server closed the stream without StreamEnd", self.stream_id)
        self._state = StreamState.CLOSED
        self._error = error
        self._events.put_nowait(_Closed(error))
        self._credit_changed.set()

    # Lifecycle

    async def aclose(self) -> None:
        """Cancel the call if it is still running and stop the reader. Safe to call twice."""
        if self._state is not StreamState.CLOSED:
            logger.debug("stream %s: cancelled by the client in state %s", self.stream_id, self._state.value)
            self._close(None, by_client=True)
            self._call.cancel()
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            # gather returns the reader's CancelledError instead of raising it,
            # but still raises if the task calling aclose is cancelled.
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> StreamSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _optional_duration(seconds: float | None) -> duration_pb2.Duration | None:
    return None if seconds is None else _duration(seconds)
