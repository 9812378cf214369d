"""Chunks left unanswered when a stream ends, and roll-over to a new stream, against scripted calls."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest
from client_fakes import FakeClock, FakeStreamCall

from streaminfer.client import (
    ChunkFailed,
    ChunksAcked,
    DeadlineExceededError,
    Modality,
    StreamEnded,
    StreamEvent,
    StreamRolledOver,
    StreamSession,
    StreamState,
    UnavailableError,
    stream_config,
)
from streaminfer.client._session import accept_stream
from streaminfer.v1 import streaminfer_pb2 as pb

CONFIG = stream_config(["silero_vad", "minilm_embedding"])
DRAINING = pb.STREAM_END_REASON_DRAINING
MAX_DURATION = pb.STREAM_END_REASON_MAX_DURATION
IDLE_TIMEOUT = pb.STREAM_END_REASON_IDLE_TIMEOUT


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=10))


async def _yield_to_loop(times: int = 10) -> None:
    for _ in range(times):
        await asyncio.sleep(0)


class Reopener:
    """The session's ``reopen``: hands out new scripted calls, or raises the errors queued in ``failures``."""

    def __init__(self, window: int = 8) -> None:
        self.window = window
        self.calls: list[FakeStreamCall] = []
        self.failures: list[BaseException] = []

    async def __call__(self) -> tuple[FakeStreamCall, pb.StreamResponse]:
        if self.failures:
            raise self.failures.pop(0)
        call = FakeStreamCall(self.window, stream_id=f"stream-{len(self.calls) + 2}")
        self.calls.append(call)
        return call, await accept_stream(call, CONFIG)


async def _open(window: int = 8, *, roll_over: bool = True) -> tuple[StreamSession, FakeStreamCall, Reopener]:
    call = FakeStreamCall(window, stream_id="stream-1")
    reopener = Reopener(window)
    session = await StreamSession.open(call, CONFIG, clock=FakeClock(), reopen=reopener if roll_over else None)
    return session, call, reopener


def _media(call: FakeStreamCall) -> list[tuple[str, int]]:
    """Return (kind, sequence number or flushed modality) of each request after the config, in write order."""
    written = []
    for request in call.requests:
        kind = request.WhichOneof("request")
        if kind == "config":
            continue
        if kind == "control":
            written.append(("flush", request.control.modality))
        else:
            written.append((kind, getattr(request, kind).sequence_number))
    return written


async def _events_until(session: StreamSession, kind: type) -> list[StreamEvent]:
    events = []
    while True:
        event = await session.next_event()
        assert event is not None, f"the session ended before a {kind.__name__} event"
        events.append(event)
        if isinstance(event, kind):
            return events


# Unanswered chunks without roll-over


def test_stream_end_fails_unanswered_chunks() -> None:
    async def scenario() -> None:
        session, call, _ = await _open(roll_over=False)
        await session.send_audio(b"a")
        await session.send_audio(b"b")
        await session.send_text("c")
        call.ack(pb.MODALITY_AUDIO, 1, 1)

        call.end_by_server(DRAINING, grpc.StatusCode.UNAVAILABLE, "the server is draining")

        events = []
        with pytest.raises(UnavailableError, match="draining"):
            async for event in session:
                events.append(event)
        assert [type(event) for event in events] == [ChunksAcked, ChunkFailed, ChunkFailed, StreamEnded]
        failed = [event for event in events if isinstance(event, ChunkFailed)]
        assert [(event.modality, event.sequence_number) for event in failed] == [
            (Modality.AUDIO, 2), (Modality.TEXT, 1),
        ]
        for event in failed:
            assert event.reason == "SHUTDOWN"
            assert event.from_client
            assert "the server ended stream stream-1 (DRAINING) before reading this chunk" in event.message
            assert "resend it on a new stream" in event.message
        assert events[-1].reason == "DRAINING"
        assert session.stats.modality(Modality.AUDIO).failures_by_reason == {"SHUTDOWN": 1}
        assert session.stats.modality(Modality.TEXT).failed == 1
        assert session.stats.modality(Modality.AUDIO).unanswered == 0
        assert session.in_flight == 0

    run(scenario)


def test_call_error_fails_unanswered_chunks() -> None:
    async def scenario() -> None:
        session, call, _ = await _open(roll_over=False)
        await session.send_frame(b"v")

        call.fail(grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "reset"))

        event = await session.next_event()
        assert isinstance(event, ChunkFailed)
        assert event.reason == "SHUTDOWN"
        assert "stream stream-1 failed (UNAVAILABLE: reset) before this chunk was answered" in event.message
        assert "the server may have processed it already" in event.message
        with pytest.raises(UnavailableError):
            await session.next_event()
        assert session.stats.modality(Modality.VIDEO).failed == 1

    run(scenario)


def test_server_end_without_roll_over_keeps_error() -> None:
    async def scenario() -> None:
        session, call, reopener = await _open(roll_over=False)
        call.end_by_server(MAX_DURATION, grpc.StatusCode.DEADLINE_EXCEEDED)

        with pytest.raises(DeadlineExceededError):
            [event async for event in session]
        assert reopener.calls == []
        assert session.stream_end is not None
        assert session.stream_end.reason == MAX_DURATION

    run(scenario)


# Roll-over


def test_roll_over_resends_in_order() -> None:
    async def scenario() -> None:
        session, first, reopener = await _open()
        await session.send_audio(b"a1")
        await session.send_text("t1")
        await session.send_audio(b"a2")
        await session.flush("audio")
        await session.send_text("t2")
        first.ack(pb.MODALITY_AUDIO, 1, 1)
        await _yield_to_loop()

        first.end_by_server(MAX_DURATION, grpc.StatusCode.DEADLINE_EXCEEDED, "max stream duration")
        events = await _events_until(session, StreamRolledOver)

        [second] = reopener.calls
        assert not any(isinstance(event, ChunkFailed) for event in events)
        rolled = events[-1]
        assert rolled.previous_stream_id == "stream-1"
        assert rolled.stream_id == "stream-2"
        assert rolled.reason == "MAX_DURATION"
        assert rolled.resent == ((Modality.TEXT, 1), (Modality.AUDIO, 2), (Modality.TEXT, 2))
        assert second.requests[0].config == CONFIG
        assert _media(second) == [("text", 1), ("audio", 2), ("flush", pb.MODALITY_AUDIO), ("text", 2)]
        assert second.requests[2].audio.audio_content == b"a2"
        assert session.stream_id == "stream-2"
        assert session.state is StreamState.OPEN

        # Numbers go on from the first stream.
        assert await session.send_audio(b"a3") == 3
        assert _media(second)[-1] == ("audio", 3)
        second.ack(pb.MODALITY_TEXT, 1, 2)
        second.ack(pb.MODALITY_AUDIO, 2, 3)
        second.end_by_server(pb.STREAM_END_REASON_INPUT_ENDED, grpc.StatusCode.OK)
        await session.end_input()
        rest = [event async for event in session]

        assert isinstance(rest[-1], StreamEnded)
        audio = session.stats.modality(Modality.AUDIO)
        text = session.stats.modality(Modality.TEXT)
        assert (audio.sent, audio.acked, audio.failed, audio.resent) == (3, 3, 0, 1)
        assert (text.sent, text.acked, text.failed, text.resent) == (2, 2, 0, 2)
        assert session.stats.rollovers == 1
        assert session.stats.unexpected_answers == 0
        assert second.half_closed

    run(scenario)


def test_roll_over_on_draining_without_chunks() -> None:
    async def scenario() -> None:
        session, first, reopener = await _open()

        first.end_by_server(DRAINING, grpc.StatusCode.UNAVAILABLE, "draining")
        [rolled] = await _events_until(session, StreamRolledOver)

        assert rolled.resent == ()
        assert len(reopener.calls) == 1
        assert await session.send_text("after") == 1
        assert _media(reopener.calls[0]) == [("text", 1)]
        await session.aclose()

    run(scenario)


def test_roll_over_drops_answered_flush() -> None:
    async def scenario() -> None:
        session, first, reopener = await _open()
        await session.send_audio(b"a1")
        await session.flush()
        first.ack(pb.MODALITY_AUDIO, 1, 1)
        await _yield_to_loop()

        first.end_by_server(DRAINING, grpc.StatusCode.UNAVAILABLE)
        await _events_until(session, StreamRolledOver)

        assert _media(reopener.calls[0]) == []
        await session.aclose()

    run(scenario)


def test_roll_over_resends_write_after_end() -> None:
    async def scenario() -> None:
        session, first, reopener = await _open()
        first.end_by_server(MAX_DURATION, grpc.StatusCode.DEADLINE_EXCEEDED)
        # The reader has read the end; this write meets the finished call.
        await _yield_to_loop()
        assert first.finished

        number = await session.send_audio(b"late")
        await _events_until(session, StreamRolledOver)

        assert number == 1
        assert _media(first) == []
        assert _media(reopener.calls[0]) == [("audio", 1)]
        await session.aclose()

    run(scenario)


def test_roll_over_resends_server_shutdown_errors() -> None:
    async def scenario() -> None:
        session, first, reopener = await _open()
        await session.send_audio(b"a1")
        await session.send_audio(b"a2")
        shutdown = pb.ChunkError(
            modality=pb.MODALITY_AUDIO, sequence_number=1, reason=pb.CHUNK_ERROR_REASON_SHUTDOWN, message="draining"
        )
        first.respond(pb.StreamResponse(errors=[shutdown]))

        first.end_by_server(DRAINING, grpc.StatusCode.UNAVAILABLE)
        events = await _events_until(session, StreamRolledOver)

        assert not any(isinstance(event, ChunkFailed) for event in events)
        assert events[-1].resent == ((Modality.AUDIO, 1), (Modality.AUDIO, 2))
        assert _media(reopener.calls[0]) == [("audio", 1), ("audio", 2)]
        assert session.stats.modality(Modality.AUDIO).failed == 0
        await session.aclose()

    run(scenario)


def test_server_shutdown_error_reported_without_roll_over() -> None:
    async def scenario() -> None:
        session, first, reopener = await _open()
        await session.send_audio(b"a1")
        await session.end_input()
        shutdown = pb.ChunkError(
            modality=pb.MODALITY_AUDIO, sequence_number=1, reason=pb.CHUNK_ERROR_REASON_SHUTDOWN, message="no time left"
        )
        first.respond(pb.StreamResponse(errors=[shutdown]))
        # An INPUT_ENDED end is no reason to roll over, so the kept error is reported.
        first.end_by_server(pb.STREAM_END_REASON_INPUT_ENDED, grpc.StatusCode.OK)

        events = [event async for event in session]

        assert [type(event) for event in events] == [ChunkFailed, StreamEnded]
        assert events[0].message == "no time left"
        assert not events[0].from_client
        assert reopener.calls == []

    run(scenario)


def test_no_roll_over_after_call_error() -> None:
    async def scenario() -> None:
        session, first, reopener = await _open()
        await session.send_text("t1")

        first.fail(grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "reset"))

        failed = await session.next_event()
        assert isinstance(failed, ChunkFailed)
        with pytest.raises(UnavailableError):
            await session.next_event()
        assert reopener.calls == []

    run(scenario)


def test_input_ended_and_answered_ends_cleanly() -> None:
    async def scenario() -> None:
        session, first, reopener = await _open()
        await session.send_text("t1")
        await session.end_input()
        first.ack(pb.MODALITY_TEXT, 1, 1)

        first.end_by_server(DRAINING, grpc.StatusCode.UNAVAILABLE)
        events = [event async for event in session]

        assert [type(event) for event in events] == [ChunksAcked, StreamEnded]
        assert reopener.calls == []
        assert session.state is StreamState.CLOSED

    run(scenario)


def test_roll_over_after_input_ended_half_closes() -> None:
    async def scenario() -> None:
        session, first, reopener = await _open()
        await session.send_text("t1")
        await session.end_input()

        first.end_by_server(DRAINING, grpc.StatusCode.UNAVAILABLE)
        await _events_until(session, StreamRolledOver)

        [second] = reopener.calls
        assert _media(second) == [("text", 1)]
        assert second.half_closed
        second.ack(pb.MODALITY_TEXT, 1, 1)
        second.end_by_server(pb.STREAM_END_REASON_INPUT_ENDED, grpc.StatusCode.OK)
        events = [event async for event in session]
        assert [type(event) for event in events] == [ChunksAcked, StreamEnded]

    run(scenario)


def test_idle_timeout_waits_for_input() -> None:
    async def scenario() -> None:
        session, first, reopener = await _open()
        await session.send_text("t1")
        first.ack(pb.MODALITY_TEXT, 1, 1)
        first.end_by_server(IDLE_TIMEOUT, grpc.StatusCode.DEADLINE_EXCEEDED, "idle")
        await _yield_to_loop()

        assert reopener.calls == []
        await session.flush()
        assert reopener.calls == []

        assert await session.send_text("t2") == 2
        events = await _events_until(session, StreamRolledOver)

        assert events[-1].reason == "IDLE_TIMEOUT"
        assert events[-1].resent == ()
        assert _media(reopener.calls[0]) == [("text", 2)]
        await session.aclose()

    run(scenario)


def test_idle_timeout_then_end_input() -> None:
    async def scenario() -> None:
        session, first, reopener = await _open()
        first.end_by_server(IDLE_TIMEOUT, grpc.StatusCode.DEADLINE_EXCEEDED, "idle")
        await _yield_to_loop()

        await session.end_input()
        events = [event async for event in session]

        assert [type(event) for event in events] == [StreamEnded]
        assert events[0].reason == "IDLE_TIMEOUT"
        assert reopener.calls == []
        assert session.state is StreamState.CLOSED

    run(scenario)


def test_reopen_failure_fails_unanswered() -> None:
    async def scenario() -> None:
        session, first, reopener = await _open()
        await session.send_audio(b"a1")
        reopener.failures.append(UnavailableError("the server is overloaded", grpc.StatusCode.UNAVAILABLE))

        first.end_by_server(DRAINING, grpc.StatusCode.UNAVAILABLE)
        events = []
        with pytest.raises(UnavailableError, match="overloaded"):
            async for event in session:
                events.append(event)

        assert [type(event) for event in events] == [ChunkFailed, StreamEnded]
        assert "no new stream could be opened to resend it" in events[0].message
        assert session.stats.modality(Modality.AUDIO).failures_by_reason == {"SHUTDOWN": 1}
        with pytest.raises(UnavailableError):
            await session.send_audio(b"a2")

    run(scenario)


def test_sender_waits_during_roll_over() -> None:
    async def scenario() -> None:
        session, first, reopener = await _open(window=1)
        await session.send_audio(b"a1")
        blocked = asyncio.create_task(session.send_audio(b"a2"))
        await _yield_to_loop()
        assert not blocked.done()

        first.end_by_server(MAX_DURATION, grpc.StatusCode.DEADLINE_EXCEEDED)
        await _events_until(session, StreamRolledOver)
        [second] = reopener.calls
        second.ack(pb.MODALITY_AUDIO, 1, 1)

        assert await asyncio.wait_for(blocked, timeout=1) == 2
        assert _media(second) == [("audio", 1), ("audio", 2)]
        assert _media(first) == [("audio", 1)]
        await session.aclose()

    run(scenario)


def test_stalled_roll_overs_end_session() -> None:
    async def scenario() -> None:
        session, first, reopener = await _open()
        await session.send_audio(b"a1")
        first.end_by_server(DRAINING, grpc.StatusCode.UNAVAILABLE)
        await _events_until(session, StreamRolledOver)

        # Each new stream ends again before answering the resent chunk; the
        # third such stream in a row ends the session.
        for _ in range(2):
            reopener.calls[-1].end_by_server(DRAINING, grpc.StatusCode.UNAVAILABLE)
            await _events_until(session, StreamRolledOver)
        reopener.calls[-1].end_by_server(DRAINING, grpc.StatusCode.UNAVAILABLE)

        events = []
        with pytest.raises(UnavailableError):
            async for event in session:
                events.append(event)
        assert [type(event) for event in events] == [ChunkFailed, StreamEnded]
        assert len(reopener.calls) == 3

    run(scenario)
