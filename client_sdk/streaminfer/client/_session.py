"""The client side of a stream: one ``InferenceService.Stream`` call, or a series in roll-over mode.

A session owns the current call and one reader task. Senders number their
chunks per modality and wait for credit in the server's in-flight window. The
reader settles chunks as acks and errors arrive, so credit comes free even
when no one consumes the events. When the call ends, the reader reports the
chunks left unanswered, or, in roll-over mode after a server-side end, opens
the next stream and writes them again.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import grpc
from google.protobuf import duration_pb2

from streaminfer.client._config import Modality
from streaminfer.client._errors import RpcError, StreaminferError, StreamStateError, error_from_rpc_error
from streaminfer.client._events import (
    ChunkFailed,
    ChunksAcked,
    Result,
    StreamEnded,
    StreamEvent,
    StreamRolledOver,
    end_reason,
)
from streaminfer.client._rollover import ChunkKey, ResendLog
from streaminfer.client._tracker import ChunkTracker, StreamStats
from streaminfer.v1 import streaminfer_pb2 as pb

__all__ = ["Reopen", "StreamCall", "StreamSession", "StreamState", "accept_stream"]

logger = logging.getLogger(__name__)


class StreamCall(Protocol):
    """The part of ``grpc.aio.StreamStreamCall`` a session uses; tests pass a fake."""

    async def write(self, request: pb.StreamRequest) -> None: ...

    async def done_writing(self) -> None: ...

    async def read(self) -> object: ...

    def cancel(self) -> bool: ...


# Opens the next stream of a session in roll-over mode, with the first config
# and the client's retry policy. It returns the call and the server's first
# message, as accept_stream does.
Reopen = Callable[[], Awaitable[tuple[StreamCall, pb.StreamResponse]]]

# Server-side ends after which a session in roll-over mode opens the next
# stream at once. After IDLE_TIMEOUT it waits until the user sends again.
_ROLL_OVER_REASONS = frozenset({pb.STREAM_END_REASON_DRAINING, pb.STREAM_END_REASON_MAX_DURATION})
_SERVER_END_REASONS = _ROLL_OVER_REASONS | {pb.STREAM_END_REASON_IDLE_TIMEOUT}
# Streams in a row that may end without answering any of the chunks resent on
# them before the session stops rolling over and fails.
_MAX_STALLED_ROLLOVERS = 3


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


class _NextStep(enum.Enum):
    """The reader's next step after a call ends."""

    END = "end"
    ROLL_OVER = "roll_over"
    # Wait until the user sends again, then roll over; or end at end_input.
    WAIT_FOR_INPUT = "wait_for_input"


async def accept_stream(call: StreamCall, config: pb.StreamConfig) -> pb.StreamResponse:
    """Send ``config`` on a new call and return the server's first message, which carries ``SessionAccepted``.

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
    return response


def _window(accepted: pb.SessionAccepted, max_chunks_in_flight: int | None) -> int:
    """Return the in-flight window of a stream: the server's, lowered to ``max_chunks_in_flight``."""
    window = accepted.limits.max_chunks_in_flight
    if max_chunks_in_flight is not None:
        window = max_chunks_in_flight if window == 0 else min(window, max_chunks_in_flight)
    if window == 0:
        # NOTE: a server that reports no window gets no client-side limit;
        # HTTP/2 flow control is then the only backpressure.
        logger.warning("stream %s: server sent no max_chunks_in_flight; sending without a window", accepted.stream_id)
    return window


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


# The status that follows each server-side StreamEnd reason.
_LOST_STATUS = {
    pb.STREAM_END_REASON_DRAINING: (
        grpc.StatusCode.UNAVAILABLE,
        "the server is shutting down; continue on a new stream",
    ),
    pb.STREAM_END_REASON_MAX_DURATION: (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "the stream reached its maximum duration; continue on a new stream",
    ),
    pb.STREAM_END_REASON_IDLE_TIMEOUT: (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "the stream sent nothing for the server's idle timeout; open a new stream when there is media to send",
    ),
}


class _StatusFromStreamEnd(grpc.RpcError):
    """A call status rebuilt from the server's StreamEnd reason."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


class StreamSession:
    """An open stream: send chunks, iterate over events.

    Create one with ``AsyncClient.open_stream``. ``async for event in session``
    yields ``Result``, ``ChunksAcked``, ``ChunkFailed`` and finally
    ``StreamEnded``. Send methods wait while ``max_chunks_in_flight`` chunks
    are unanswered. Events queue up in memory until they are consumed, so a
    long stream should be iterated while it runs.

    When a stream ends with chunks unanswered, the session emits a
    ``ChunkFailed`` with reason SHUTDOWN for each before ``StreamEnded``. With
    ``reopen`` (roll-over mode), a stream the server ends with reason DRAINING
    or MAX_DURATION is followed by a new one: the session writes the
    unanswered chunks again there, with their sequence numbers, emits
    ``StreamRolledOver`` and goes on. After IDLE_TIMEOUT it opens the new
    stream when the user sends again. The server keeps model state per
    stream, so the new stream's models start from scratch.
    """

    def __init__(
        self,
        call: StreamCall,
        accepted: pb.SessionAccepted,
        *,
        max_chunks_in_flight: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        reopen: Reopen | None = None,
    ) -> None:
        self.accepted = accepted
        self._call = call
        self._clock = clock
        self._requested_window = max_chunks_in_flight
        self._tracker = ChunkTracker(_window(accepted, max_chunks_in_flight))
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

        # The current call's StreamEnd, until the call is over.
        self._call_end: pb.StreamEnd | None = None
        # Roll-over mode only.
        self._reopen = reopen
        self._resend_log = ResendLog() if reopen is not None else None
        # SHUTDOWN errors from the server for chunks kept for the next stream.
        self._deferred_errors: dict[ChunkKey, pb.ChunkError] = {}
        # True after an idle timeout, until the user sends again.
        self._waiting_for_input = False
        self._input_arrived = asyncio.Event()
        self._resent_on_call = 0
        self._answers_on_call = 0
        self._stalled_rollovers = 0

    @classmethod
    async def open(
        cls,
        call: StreamCall,
        config: pb.StreamConfig,
        *,
        max_chunks_in_flight: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        reopen: Reopen | None = None,
    ) -> StreamSession:
        """Send ``config``, wait for ``SessionAccepted`` and start reading.

        Raises the SDK error for the server's status when it rejects the config.
        """
        response = await accept_stream(call, config)
        return cls.start(call, response, max_chunks_in_flight=max_chunks_in_flight, clock=clock, reopen=reopen)

    @classmethod
    def start(
        cls,
        call: StreamCall,
        response: pb.StreamResponse,
        *,
        max_chunks_in_flight: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        reopen: Reopen | None = None,
    ) -> StreamSession:
        """Start reading a call whose first message, ``response``, accepted the stream."""
        session = cls(
            call, response.session_accepted, max_chunks_in_flight=max_chunks_in_flight, clock=clock, reopen=reopen
        )
        logger.debug("stream %s: accepted, window %d chunks", session.stream_id, session._tracker.max_in_flight)
        # The first message may already carry more than the acceptance.
        session._handle(response)
        session._reader = asyncio.create_task(session._read_responses(), name=f"streaminfer-read-{session.stream_id}")
        return session

    # Properties

    @property
    def stream_id(self) -> str:
        """The current stream's id; a roll-over changes it."""
        return self.accepted.stream_id

    @property
    def roll_over(self) -> bool:
        """True when the session goes on in a new stream after a server-side end."""
        return self._reopen is not None

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
        """The last stream's ``StreamEnd``, once the session has ended."""
        return self._end

    def outstanding(self, modality: Modality) -> list[int]:
        """Return the sequence numbers of the modality's chunks not yet answered."""
        return self._tracker.outstanding(modality)

    # Sending

    async def send_audio(self, content: bytes, timestamp: float | None = None) -> int:
        """Send audio samples in the stream's audio format; return the chunk's sequence number.

        ``timestamp`` is the media time of the first sample, in seconds. Raises
        ValueError for a chunk over the stream's ``max_audio_chunk_bytes``.
        """
        self._check_size(
            "audio chunk", len(content), "max_audio_chunk_bytes", self.limits.max_audio_chunk_bytes,
            "send shorter chunks, for example of 32 ms as iter_wav_chunks cuts them",
        )
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
        self._check_size(
            "frame", len(content), "max_frame_bytes", self.limits.max_frame_bytes,
            "lower the resolution or the JPEG quality",
        )
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
        Raises ValueError for a piece over the stream's ``max_text_chunk_bytes``
        once encoded.
        """
        data = text.encode("utf-8") if isinstance(text, str) else text
        self._check_size(
            "text chunk", len(data), "max_text_chunk_bytes", self.limits.max_text_chunk_bytes,
            "send the text in smaller pieces, for example line by line as iter_text_chunks cuts it",
        )
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
            if self._waiting_for_input:
                # The server answered every chunk before its idle timeout, and
                # a new stream has nothing buffered, so there is nothing to flush.
                return
            if self._resend_log is not None:
                self._resend_log.add_flush(request)
            await self._write(request, resendable=self._resend_log is not None)

    async def end_input(self) -> None:
        """Half-close the call: no more input follows. Events keep arriving until ``StreamEnded``.

        In roll-over mode, a stream that the server ends before all chunks are
        answered is still followed by a new one, and that is half-closed too.
        """
        self._require_state(StreamState.OPEN, "end_input")
        self._state = StreamState.INPUT_ENDED
        self._credit_changed.set()

        # Writes already holding or queued on the lock finish first.
        async with self._write_lock:
            if self._waiting_for_input:
                # No stream is open; the reader ends the session.
                self._input_arrived.set()
                return
            try:
                await self._call.done_writing()
            except grpc.aio.AioRpcError as error:
                if self._reopen is None:
                    raise error_from_rpc_error(error) from error
                # The reader sees the call end and half-closes the next stream, if any.
                logger.debug("stream %s: half-close failed: %s", self.stream_id, error)

    def _check_size(self, kind: str, size: int, limit_name: str, limit: int, advice: str) -> None:
        # The server rejects a chunk over its limit with a TOO_LARGE ChunkError,
        # but a chunk over gRPC's message limit (the client's max_message_bytes,
        # or the server's, about max_frame_bytes) fails the whole call instead.
        # So a chunk over the stream's limit is rejected here, before it takes
        # a sequence number. A limit of 0 means the server reported none.
        if limit > 0 and size > limit:
            raise ValueError(
                f"{kind} of {size} bytes is over the stream's {limit_name} of {limit} bytes: {advice}"
            )

    async def _send_chunk(self, modality: Modality, build: Callable[[int], pb.StreamRequest]) -> int:
        self._require_state(StreamState.OPEN, f"send {modality.label}")

        # 1. Wait for window credit, and for a new stream after an idle
        # timeout, then take a sequence number.
        while self._state is StreamState.OPEN and (self._waiting_for_input or not self._tracker.has_credit):
            if self._waiting_for_input:
                self._input_arrived.set()
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
                request = build(number)
                self._tracker.mark_sent(modality, number, self._clock())
                if self._resend_log is not None:
                    self._resend_log.add_chunk(modality, number, request)
                written = True
                await self._write(request, resendable=self._resend_log is not None)
        finally:
            if not written:
                self._tracker.cancel(modality, number)
                self._credit_changed.set()
        return number

    async def _write(self, request: pb.StreamRequest, *, resendable: bool = False) -> None:
        try:
            await self._call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
            if resendable:
                # The call has ended. The request is in the resend log, so the
                # reader writes it on the next stream or, when the session
                # ends instead, reports the chunk as failed.
                logger.debug("stream %s: write failed, left to the resend log: %r", self.stream_id, error)
                return
            if isinstance(error, grpc.aio.AioRpcError):
                if error.code() == grpc.StatusCode.INTERNAL and self._reopen is None and self._reader is not None:
                    # A write that fails because the server has just ended the
                    # call gets INTERNAL from grpc's aio client in place of the
                    # server's status. The reader sees StreamEnd first, so its
                    # outcome names the real reason. Without roll-over the reader
                    # ends the session without the write lock held here.
                    await asyncio.wait({self._reader})
                    self._require_state(StreamState.OPEN, "write")
                raise error_from_rpc_error(error) from error
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
                error = await self._read_call()
                if not await self._after_call(error):
                    return
        except asyncio.CancelledError:
            self._close(None, by_client=True)
            raise

    async def _read_call(self) -> StreaminferError | None:
        """Read the current call to its end; return the SDK error of its status, or None for OK."""
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    return None
                assert isinstance(response, pb.StreamResponse)
                self._handle(response)
        except grpc.aio.AioRpcError as rpc_error:
            error = error_from_rpc_error(rpc_error)
            end = self._call_end
            if end is not None and end.reason in _LOST_STATUS and rpc_error.code() == grpc.StatusCode.INTERNAL:
                # The server sent StreamEnd and then its status. When a write
                # of this client is under way at that moment, grpc's client
                # replaces that status with INTERNAL. StreamEnd still carries the reason.
                code, message = _LOST_STATUS[end.reason]
                error = error_from_rpc_error(_StatusFromStreamEnd(code, message))
            logger.debug("stream %s: call failed: %s", self.stream_id, error)
            return error

    def _handle(self, response: pb.StreamResponse) -> None:
        now = self._clock()
        events: list[StreamEvent] = []

        for result in response.results:
            self._tracker.stats.results_by_model[result.model] += 1
            events.append(Result(result))
        for ack in response.acks:
            modality = Modality(ack.modality)
            settled = self._tracker.ack(modality, ack.first_sequence_number, ack.last_sequence_number, now)
            if self._resend_log is not None:
                for number, _ in settled:
                    self._resend_log.remove_chunk(modality, number)
            self._answers_on_call += len(settled)
            events.append(ChunksAcked(ack, tuple(settled)))
        for chunk_error in response.errors:
            modality = Modality(chunk_error.modality)
            if self._defer_shutdown_error(modality, chunk_error):
                continue
            reason = pb.ChunkErrorReason.Name(chunk_error.reason).removeprefix("CHUNK_ERROR_REASON_")
            latency = self._tracker.fail(modality, chunk_error.sequence_number, reason, now)
            if latency is not None:
                self._answers_on_call += 1
                if self._resend_log is not None:
                    self._resend_log.remove_chunk(modality, chunk_error.sequence_number)
            events.append(ChunkFailed(chunk_error, latency))
        if response.HasField("stream_end"):
            # Its event follows once the call is over, after any chunks it left unanswered.
            self._call_end = response.stream_end

        if response.acks or response.errors:
            self._credit_changed.set()
        for event in events:
            self._events.put_nowait(event)

    def _defer_shutdown_error(self, modality: Modality, chunk_error: pb.ChunkError) -> bool:
        """Keep a chunk the server could not process before its stream ended for the next stream.

        Only in roll-over mode. The chunk keeps its window slot until the next
        stream answers it. Returns True when the error was kept back.
        """
        if self._resend_log is None or chunk_error.reason != pb.CHUNK_ERROR_REASON_SHUTDOWN:
            return False
        key = (modality, chunk_error.sequence_number)
        if not self._tracker.is_written(*key) or key in self._deferred_errors:
            return False
        self._deferred_errors[key] = chunk_error
        return True

    # Ending a call

    async def _after_call(self, error: StreaminferError | None) -> bool:
        """Roll over, wait for input after an idle timeout, or end the session; return True while it goes on."""
        end, self._call_end = self._call_end, None
        if self._reopen is None:
            self._finish(end, error)
            return False
        self._count_stalled_call()

        # The lock keeps senders from writing while the session decides and
        # while it writes the resent chunks on the next stream.
        async with self._write_lock:
            step = self._next_step(end)
            if step is _NextStep.END:
                self._finish(end, None if self._ended_complete(end) else error)
                return False
            assert end is not None
            if step is _NextStep.ROLL_OVER:
                return await self._roll_over(end, error)
            self._wait_for_input(end)

        await self._input_arrived.wait()
        async with self._write_lock:
            self._waiting_for_input = False
            if self._state is not StreamState.OPEN and self._tracker.in_flight == 0:
                # end_input while no stream was open: the session is complete.
                self._finish(end, None)
                return False
            return await self._roll_over(end, error)

    def _next_step(self, end: pb.StreamEnd | None) -> _NextStep:
        if end is None or end.reason not in _SERVER_END_REASONS or self._state is StreamState.CLOSED:
            return _NextStep.END
        if self._ended_complete(end):
            return _NextStep.END
        if self._stalled_rollovers >= _MAX_STALLED_ROLLOVERS:
            logger.warning(
                "stream %s: %d streams in a row ended without answering a resent chunk; ending the session",
                self.stream_id, self._stalled_rollovers,
            )
            return _NextStep.END
        if end.reason in _ROLL_OVER_REASONS or self._tracker.in_flight > 0:
            return _NextStep.ROLL_OVER
        return _NextStep.WAIT_FOR_INPUT

    def _ended_complete(self, end: pb.StreamEnd | None) -> bool:
        """True when a server-side end left nothing to do: input had ended and every chunk was answered."""
        return (
            self._reopen is not None
            and end is not None
            and end.reason in _SERVER_END_REASONS
            and self._state is StreamState.INPUT_ENDED
            and self._tracker.in_flight == 0
        )

    def _count_stalled_call(self) -> None:
        if self._resent_on_call > 0 and self._answers_on_call == 0:
            self._stalled_rollovers += 1
        else:
            self._stalled_rollovers = 0
        self._resent_on_call = 0
        self._answers_on_call = 0

    def _wait_for_input(self, end: pb.StreamEnd) -> None:
        logger.info(
            "stream %s ended with %s and every chunk answered; a new stream opens when the session sends again",
            self.stream_id, end_reason(end),
        )
        self._waiting_for_input = True
        self._input_arrived.clear()
        if self._resend_log is not None:
            # Only flushes can be left, and a new stream has nothing to flush.
            self._resend_log.clear()

    async def _roll_over(self, end: pb.StreamEnd, call_error: StreaminferError | None) -> bool:
        """Open the next stream and write the unanswered chunks again; return False when that failed.

        Runs with the write lock held.
        """
        assert self._reopen is not None and self._resend_log is not None
        previous_id = self.stream_id
        logger.info(
            "stream %s ended with %s (%s) and %d chunk(s) unanswered; opening a new stream",
            previous_id, end_reason(end), call_error or "OK", self._tracker.in_flight,
        )
        try:
            call, response = await self._reopen()
        except StreaminferError as error:
            logger.warning("stream %s: no new stream could be opened, so the session ends: %s", previous_id, error)
            self._finish(end, error, reopen_error=error)
            return False

        self._call = call
        self.accepted = response.session_accepted
        self._tracker.max_in_flight = _window(self.accepted, self._requested_window)
        self._deferred_errors.clear()
        resent = await self._resend()
        if self._state is not StreamState.OPEN:
            await self._half_close_after_roll_over()

        self._tracker.stats.rollovers += 1
        logger.info("stream %s goes on as stream %s; %d chunk(s) resent", previous_id, self.stream_id, len(resent))
        self._events.put_nowait(StreamRolledOver(end, previous_id, self.accepted, resent))
        self._handle(response)
        self._credit_changed.set()
        return True

    async def _resend(self) -> tuple[ChunkKey, ...]:
        """Write the resend log on the new call; stop early if that call ends too."""
        assert self._resend_log is not None
        resent: list[ChunkKey] = []
        for key, request in self._resend_log.entries():
            try:
                await self._call.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
                # The reader reads why the call ended next; the rest stays in the log.
                logger.info("stream %s: ended while chunks were resent: %r", self.stream_id, error)
                break
            if key is not None:
                self._tracker.mark_resent(*key)
                resent.append(key)
        self._resent_on_call = len(resent)
        return tuple(resent)

    async def _half_close_after_roll_over(self) -> None:
        try:
            await self._call.done_writing()
        except grpc.aio.AioRpcError as error:
            logger.info("stream %s: half-close failed: %s", self.stream_id, error)

    def _finish(
        self,
        end: pb.StreamEnd | None,
        error: StreaminferError | None,
        *,
        reopen_error: StreaminferError | None = None,
    ) -> None:
        """End the session: report unanswered chunks as failed, then the StreamEnd, then close."""
        events: list[StreamEvent] = self._fail_unanswered(end, error, reopen_error)
        if end is not None:
            self._end = end
            events.append(StreamEnded(end))
        for event in events:
            self._events.put_nowait(event)
        self._close(error)

    def _fail_unanswered(
        self, end: pb.StreamEnd | None, error: StreaminferError | None, reopen_error: StreaminferError | None
    ) -> list[StreamEvent]:
        unanswered = self._tracker.unanswered()
        if not unanswered:
            return []
        message = self._unanswered_message(end, error, reopen_error)
        logger.warning("stream %s: %d chunk(s) unanswered at its end: %s", self.stream_id, len(unanswered), message)
        now = self._clock()
        events: list[StreamEvent] = []
        for modality, number in unanswered:
            server_error = self._deferred_errors.pop((modality, number), None)
            proto = server_error or pb.ChunkError(
                modality=int(modality),
                sequence_number=number,
                reason=pb.CHUNK_ERROR_REASON_SHUTDOWN,
                message=message,
            )
            latency = self._tracker.fail(modality, number, "SHUTDOWN", now)
            events.append(ChunkFailed(proto, latency, from_client=server_error is None))
        if self._resend_log is not None:
            self._resend_log.clear()
        return events

    def _unanswered_message(
        self, end: pb.StreamEnd | None, error: StreaminferError | None, reopen_error: StreaminferError | None
    ) -> str:
        if end is not None and reopen_error is not None:
            return (
                f"the server ended stream {self.stream_id} ({end_reason(end)}) before reading this chunk, and no "
                f"new stream could be opened to resend it ({reopen_error}); resend it on a new stream"
            )
        if end is not None:
            return (
                f"the server ended stream {self.stream_id} ({end_reason(end)}) before reading this chunk, "
                "so it was not processed; resend it on a new stream"
            )
        cause = f"failed ({error})" if error is not None else "ended without StreamEnd"
        return (
            f"stream {self.stream_id} {cause} before this chunk was answered; it can be resent on a new "
            "stream, but the server may have processed it already"
        )

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
