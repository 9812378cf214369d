"""StreamSession against a scripted call: numbering, the window, events, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest
from client_fakes import FakeClock, FakeStreamCall, rpc_error

from streaminfer.client import (
    ChunkFailed,
    ChunksAcked,
    InvalidArgumentError,
    Modality,
    Result,
    RpcError,
    StreamEnded,
    StreamSession,
    StreamState,
    StreamStateError,
    UnavailableError,
    stream_config,
)
from streaminfer.v1 import streaminfer_pb2 as pb

CONFIG = stream_config(["silero_vad", "hog_people"])


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=10))


async def _open(window: int = 2, clock: FakeClock | None = None) -> tuple[StreamSession, FakeStreamCall]:
    call = FakeStreamCall(window)
    session = await StreamSession.open(call, CONFIG, clock=clock or FakeClock())
    return session, call


async def _yield_to_loop(times: int = 5) -> None:
    for _ in range(times):
        await asyncio.sleep(0)


def test_open_sends_config_first() -> None:
    async def scenario() -> None:
        session, call = await _open()

        assert call.requests[0].WhichOneof("request") == "config"
        assert call.requests[0].config == CONFIG
        assert session.stream_id == "fake-stream"
        assert session.max_chunks_in_flight == 2
        assert session.state is StreamState.OPEN
        await session.aclose()

    run(scenario)


def test_sequence_numbers_per_modality_on_wire() -> None:
    async def scenario() -> None:
        session, call = await _open(window=100)

        numbers = [
            await session.send_audio(b"\0" * 4, timestamp=0.0),
            await session.send_frame(b"jpeg"),
            await session.send_audio(b"\0" * 4, timestamp=0.032),
            await session.send_text("hello "),
            await session.send_frame(b"jpeg"),
            await session.send_text(b"world."),
        ]

        assert numbers == [1, 1, 2, 1, 2, 2]
        assert [r.audio.sequence_number for r in call.chunks("audio")] == [1, 2]
        assert [r.frame.sequence_number for r in call.chunks("frame")] == [1, 2]
        assert [r.text.sequence_number for r in call.chunks("text")] == [1, 2]
        assert call.chunks("text")[0].text.text == b"hello "
        assert call.chunks("audio")[1].audio.timestamp.nanos == 32_000_000
        assert not call.chunks("frame")[0].frame.HasField("timestamp")
        await session.aclose()

    run(scenario)


def test_concurrent_senders_keep_order() -> None:
    async def scenario() -> None:
        session, call = await _open(window=3)

        async def send_many(count: int) -> list[int]:
            return [await session.send_audio(b"\0\0") for _ in range(count)]

        async def acker() -> None:
            acked = 0
            while acked < 20:
                await asyncio.sleep(0)
                outstanding = session.outstanding(Modality.AUDIO)
                if outstanding:
                    call.ack(pb.MODALITY_AUDIO, outstanding[0], outstanding[-1])
                    acked += len(outstanding)
                    await _yield_to_loop()

        task = asyncio.create_task(acker())
        first, second = await asyncio.gather(send_many(10), send_many(10))
        await task

        wire = [request.audio.sequence_number for request in call.chunks("audio")]
        assert wire == sorted(wire)
        assert sorted(first + second) == list(range(1, 21))
        await session.aclose()

    run(scenario)


def test_window_blocks_until_ack() -> None:
    async def scenario() -> None:
        session, call = await _open(window=2)
        await session.send_audio(b"a")
        await session.send_frame(b"v")

        third = asyncio.create_task(session.send_audio(b"b"))
        await _yield_to_loop()

        assert not third.done(), "a third chunk was sent with a window of 2"
        assert len(call.chunks("audio")) + len(call.chunks("frame")) == 2
        assert session.in_flight == 2

        call.ack(pb.MODALITY_VIDEO, 1, 1)
        assert await asyncio.wait_for(third, timeout=1) == 2
        assert session.in_flight == 2
        await session.aclose()

    run(scenario)


def test_window_freed_by_chunk_error() -> None:
    async def scenario() -> None:
        session, call = await _open(window=1)
        await session.send_text("bad")
        blocked = asyncio.create_task(session.send_text("good"))
        await _yield_to_loop()
        assert not blocked.done()

        error = pb.ChunkError(
            modality=pb.MODALITY_TEXT,
            sequence_number=1,
            reason=pb.CHUNK_ERROR_REASON_DECODE_FAILED,
            message="invalid UTF-8",
        )
        call.respond(pb.StreamResponse(errors=[error]))

        assert await asyncio.wait_for(blocked, timeout=1) == 2
        event = await session.next_event()
        assert isinstance(event, ChunkFailed)
        assert event.reason == "DECODE_FAILED"
        assert event.message == "invalid UTF-8"
        await session.aclose()

    run(scenario)


def test_min_of_server_and_client_window() -> None:
    async def scenario() -> None:
        call = FakeStreamCall(window=64)
        session = await StreamSession.open(call, CONFIG, max_chunks_in_flight=4)

        assert session.max_chunks_in_flight == 4
        await session.aclose()

    run(scenario)


def test_latency_from_write_to_ack() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        session, call = await _open(window=10, clock=clock)
        await session.send_audio(b"a")
        clock.advance(0.010)
        await session.send_audio(b"b")
        clock.advance(0.030)

        call.ack(pb.MODALITY_AUDIO, 1, 2)
        event = await session.next_event()

        assert isinstance(event, ChunksAcked)
        assert [number for number, _ in event.latencies_s] == [1, 2]
        assert [latency for _, latency in event.latencies_s] == pytest.approx([0.040, 0.030])
        assert session.stats.latencies_s(Modality.AUDIO) == pytest.approx([0.040, 0.030])
        await session.aclose()

    run(scenario)


def test_events_in_response_order() -> None:
    async def scenario() -> None:
        session, call = await _open(window=10)
        await session.send_audio(b"a")
        await session.send_audio(b"b")
        result = pb.StreamResult(
            model="silero_vad",
            modality=pb.MODALITY_AUDIO,
            first_sequence_number=1,
            last_sequence_number=2,
            is_final=True,
        )
        result.speech.event_type = pb.SPEECH_EVENT_TYPE_SPEECH_START
        call.respond(
            pb.StreamResponse(
                results=[result],
                acks=[pb.ChunkAck(modality=pb.MODALITY_AUDIO, first_sequence_number=1, last_sequence_number=1)],
                errors=[
                    pb.ChunkError(modality=pb.MODALITY_AUDIO, sequence_number=2, reason=pb.CHUNK_ERROR_REASON_DEADLINE)
                ],
                stream_end=pb.StreamEnd(results_sent=1),
            )
        )
        call.finish()

        events = [event async for event in session]

        assert [type(event) for event in events] == [Result, ChunksAcked, ChunkFailed, StreamEnded]
        assert events[0].model == "silero_vad"
        assert events[0].kind == "speech"
        assert session.state is StreamState.CLOSED
        assert session.stats.results_by_model == {"silero_vad": 1}
        assert session.stream_end is not None

    run(scenario)


def test_results_yields_only_results() -> None:
    async def scenario() -> None:
        session, call = await _open(window=10)
        await session.send_frame(b"v")
        call.respond(pb.StreamResponse(
            results=[pb.StreamResult(model="hog_people", modality=pb.MODALITY_VIDEO, is_final=True)],
            acks=[pb.ChunkAck(modality=pb.MODALITY_VIDEO, first_sequence_number=1, last_sequence_number=1)],
        ))
        call.respond(pb.StreamResponse(stream_end=pb.StreamEnd()))
        call.finish()

        results = [result async for result in session.results()]

        assert [result.model for result in results] == ["hog_people"]

    run(scenario)


def test_end_input_half_closes() -> None:
    async def scenario() -> None:
        session, call = await _open()
        await session.send_audio(b"a")

        await session.end_input()

        assert call.half_closed
        assert session.state is StreamState.INPUT_ENDED
        with pytest.raises(StreamStateError, match="expected stream state open, got input_ended"):
            await session.send_audio(b"b")
        with pytest.raises(StreamStateError, match="cannot flush"):
            await session.flush()
        await session.aclose()

    run(scenario)


def test_flush_needs_no_credit() -> None:
    async def scenario() -> None:
        session, call = await _open(window=1)
        await session.send_text("half a sent")

        await asyncio.wait_for(session.flush(), timeout=1)

        assert call.requests[-1].control.action == pb.CONTROL_ACTION_FLUSH
        await session.aclose()

    run(scenario)


def test_flush_names_one_modality() -> None:
    async def scenario() -> None:
        session, call = await _open()

        await session.flush()
        await session.flush("audio")
        await session.flush(Modality.TEXT)
        await session.flush(pb.MODALITY_VIDEO)

        controls = [request.control for request in call.chunks("control")]
        assert [control.action for control in controls] == [pb.CONTROL_ACTION_FLUSH] * 4
        assert [control.modality for control in controls] == [
            pb.MODALITY_UNSPECIFIED,
            pb.MODALITY_AUDIO,
            pb.MODALITY_TEXT,
            pb.MODALITY_VIDEO,
        ]
        await session.aclose()

    run(scenario)


def test_flush_rejects_unknown_modality() -> None:
    async def scenario() -> None:
        session, call = await _open()

        with pytest.raises(ValueError, match="modality 'speech' is invalid"):
            await session.flush("speech")

        assert call.chunks("control") == []
        await session.aclose()

    run(scenario)


def test_config_rejected_raises_sdk_error() -> None:
    async def scenario() -> None:
        call = FakeStreamCall(accept=False)
        call.fail(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "config.models is empty: select at least one model"))

        with pytest.raises(InvalidArgumentError) as caught:
            await StreamSession.open(call, CONFIG)

        assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details == "config.models is empty: select at least one model"
        assert not caught.value.retryable
        assert str(caught.value) == "INVALID_ARGUMENT: config.models is empty: select at least one model"

    run(scenario)


def test_first_message_not_accepted() -> None:
    async def scenario() -> None:
        call = FakeStreamCall(accept=False)
        call.respond(pb.StreamResponse(stream_end=pb.StreamEnd()))

        with pytest.raises(RpcError, match="no session_accepted"):
            await StreamSession.open(call, CONFIG)

    run(scenario)


def test_call_failure_reaches_iterator_and_senders() -> None:
    async def scenario() -> None:
        session, call = await _open(window=1)
        await session.send_audio(b"a")
        blocked = asyncio.create_task(session.send_audio(b"b"))
        await _yield_to_loop()

        call.fail(rpc_error(grpc.StatusCode.UNAVAILABLE, "server is shutting down"))

        unanswered = await session.next_event()
        assert isinstance(unanswered, ChunkFailed)
        assert unanswered.sequence_number == 1
        assert unanswered.reason == "SHUTDOWN"
        with pytest.raises(UnavailableError) as caught:
            await session.next_event()
        assert caught.value.retryable
        with pytest.raises(UnavailableError):
            await blocked
        with pytest.raises(UnavailableError):
            await session.send_frame(b"v")
        assert await session.next_event() is None
        assert session.state is StreamState.CLOSED

    run(scenario)


def test_aclose_cancels_call_and_waiters() -> None:
    async def scenario() -> None:
        session, call = await _open(window=1)
        await session.send_audio(b"a")
        blocked = asyncio.create_task(session.send_audio(b"b"))
        await _yield_to_loop()

        await session.aclose()

        assert call.cancelled
        assert session.state is StreamState.CLOSED
        with pytest.raises(StreamStateError, match="got closed"):
            await blocked
        assert await session.next_event() is None
        await session.aclose()

    run(scenario)


def test_context_manager_closes() -> None:
    async def scenario() -> None:
        call = FakeStreamCall()
        async with await StreamSession.open(call, CONFIG) as session:
            await session.send_audio(b"a")

        assert call.cancelled
        assert session.state is StreamState.CLOSED

    run(scenario)


def test_eof_without_stream_end_warns(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        session, call = await _open()
        call.finish()

        assert [event async for event in session] == []

    run(scenario)
    assert any("without StreamEnd" in record.message for record in caplog.records)


def test_oversized_frame_rejected_locally() -> None:
    async def scenario() -> None:
        session, call = await _open(window=4)
        limit = session.limits.max_frame_bytes

        with pytest.raises(ValueError, match=f"frame of {limit + 1} bytes is over the stream's max_frame_bytes"):
            await session.send_frame(b"\0" * (limit + 1))

        assert call.chunks("frame") == []
        assert await session.send_frame(b"\0" * limit) == 1
        await session.aclose()

    run(scenario)


def test_oversized_audio_rejected_locally() -> None:
    async def scenario() -> None:
        session, call = await _open(window=4)
        limit = session.limits.max_audio_chunk_bytes

        # Over gRPC's message limit as well: sent, it would end the whole call.
        with pytest.raises(ValueError) as caught:
            await session.send_audio(b"\0" * (20 * 1024 * 1024))
        message = str(caught.value)
        assert f"audio chunk of {20 * 1024 * 1024} bytes is over the stream's max_audio_chunk_bytes" in message
        assert f"of {limit} bytes: send shorter chunks" in message
        with pytest.raises(ValueError, match=f"audio chunk of {limit + 1} bytes"):
            await session.send_audio(b"\0" * (limit + 1))

        # Nothing was written, and no sequence number or window slot was taken.
        assert call.chunks("audio") == []
        assert session.in_flight == 0
        assert session.stats.modality(Modality.AUDIO).sent == 0
        assert await session.send_audio(b"\0" * limit) == 1
        call.ack(pb.MODALITY_AUDIO, 1, 1)
        call.finish()
        events = [event async for event in session]
        assert not any(isinstance(event, ChunkFailed) for event in events)

    run(scenario)


def test_oversized_text_rejected_locally() -> None:
    async def scenario() -> None:
        session, call = await _open(window=4)
        limit = session.limits.max_text_chunk_bytes

        # Two bytes per character in UTF-8: the limit applies to the encoded text.
        with pytest.raises(ValueError, match=f"text chunk of {limit + 2} bytes is over the stream's "
                           f"max_text_chunk_bytes of {limit} bytes: send the text in smaller pieces"):
            await session.send_text("é" * (limit // 2 + 1))

        assert call.chunks("text") == []
        assert await session.send_text(b"x" * limit) == 1
        await session.aclose()

    run(scenario)


def test_size_checks_follow_server_limits() -> None:
    async def scenario() -> None:
        call = FakeStreamCall(4)
        session = await StreamSession.open(call, CONFIG, clock=FakeClock())
        # A server that reports no limit (0) gets no client-side check.
        session.accepted.limits.max_audio_chunk_bytes = 0
        session.accepted.limits.max_text_chunk_bytes = 8

        assert await session.send_audio(b"\0" * (1024 * 1024)) == 1
        with pytest.raises(ValueError, match="text chunk of 9 bytes is over the stream's max_text_chunk_bytes of 8"):
            await session.send_text("123456789")
        await session.aclose()

    run(scenario)


def test_stream_config_scheduling_fields() -> None:
    config = stream_config(
        ["hog_people"], priority="bulk", chunk_latency_budget_s=0.25, video_overflow_policy="backpressure"
    )

    assert config.priority == pb.PRIORITY_BULK
    assert config.chunk_latency_budget.ToNanoseconds() == 250_000_000
    assert config.video_overflow_policy == pb.OVERFLOW_POLICY_BACKPRESSURE
    interactive = stream_config(["hog_people"], priority="interactive", video_overflow_policy="keep_latest")
    assert interactive.priority == pb.PRIORITY_INTERACTIVE
    assert interactive.video_overflow_policy == pb.OVERFLOW_POLICY_KEEP_LATEST


def test_stream_config_scheduling_defaults() -> None:
    config = stream_config(["hog_people"])

    assert config.priority == pb.PRIORITY_UNSPECIFIED
    assert not config.HasField("chunk_latency_budget")
    assert config.video_overflow_policy == pb.OVERFLOW_POLICY_UNSPECIFIED


def test_scheduling_fields_reach_the_wire() -> None:
    config = stream_config(["silero_vad"], priority="bulk", chunk_latency_budget_s=1.5)

    async def scenario() -> None:
        call = FakeStreamCall(2)
        session = await StreamSession.open(call, config, clock=FakeClock())
        sent = call.requests[0].config
        assert sent.priority == pb.PRIORITY_BULK
        assert sent.chunk_latency_budget.ToNanoseconds() == 1_500_000_000
        await session.aclose()

    run(scenario)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"priority": "urgent"}, "priority 'urgent' is invalid: expected one of interactive, bulk"),
        ({"video_overflow_policy": "keep-latest"}, "video_overflow_policy 'keep-latest' is invalid: expected one of "
         "keep_latest, backpressure"),
        ({"chunk_latency_budget_s": 0}, r"chunk_latency_budget_s = 0 is invalid: expected seconds > 0, or None"),
        ({"chunk_latency_budget_s": -1.0}, r"chunk_latency_budget_s = -1.0 is invalid"),
        ({"chunk_latency_budget_s": float("inf")}, r"chunk_latency_budget_s = inf is invalid"),
    ],
)
def test_stream_config_rejects_bad_scheduling(arguments: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stream_config(["hog_people"], **arguments)  # type: ignore[arg-type]
