"""AsyncClient and SyncClient over a real gRPC channel to a fake loopback servicer."""

from __future__ import annotations

import asyncio
import socket
import threading

import grpc
import pytest
from client_fakes import FakeServer

from streaminfer.client import (
    AsyncClient,
    AudioFormat,
    ClientOptions,
    ChunkFailed,
    InvalidArgumentError,
    Modality,
    NotFoundError,
    RetryPolicy,
    SyncClient,
    StreamEnded,
    UnavailableError,
    stream_config,
)
from streaminfer.client._options import channel_arguments
from streaminfer.v1 import streaminfer_pb2 as pb


@pytest.fixture
def fake_server():
    with FakeServer(window=4) as server:
        yield server


def _unused_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_async_unary_calls(fake_server: FakeServer) -> None:
    async def scenario() -> None:
        async with AsyncClient(fake_server.target) as client:
            models = await client.list_models()
            model = await client.get_model("hog_people")
            results = await client.infer("minilm_embedding", text="Hello there.")

        assert [info.name for info in models] == ["silero_vad", "hog_people", "minilm_embedding"]
        assert list(model.labels) == ["person"]
        assert results[0].embedding.text == "Hello there."

    asyncio.run(scenario())


def test_async_not_found_maps_code_and_details(fake_server: FakeServer) -> None:
    async def scenario() -> None:
        async with AsyncClient(fake_server.target) as client:
            with pytest.raises(NotFoundError) as caught:
                await client.get_model("nope")

        assert caught.value.code is grpc.StatusCode.NOT_FOUND
        assert "model 'nope' not found" in caught.value.details
        assert str(caught.value).startswith("NOT_FOUND: model 'nope' not found")
        assert not caught.value.retryable
        assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)

    asyncio.run(scenario())


def test_unreachable_server_is_unavailable() -> None:
    target = f"127.0.0.1:{_unused_loopback_port()}"

    async def scenario() -> None:
        options = ClientOptions(unary_timeout_s=5)
        async with AsyncClient(target, options=options, retry_policy=RetryPolicy(max_attempts=1)) as client:
            with pytest.raises(UnavailableError) as caught:
                await client.list_models()
        assert caught.value.retryable

    asyncio.run(scenario())


def test_stream_round_trip_with_window(fake_server: FakeServer) -> None:
    async def scenario() -> None:
        config = stream_config(["silero_vad", "minilm_embedding"], audio=AudioFormat(16000))
        async with AsyncClient(fake_server.target) as client:
            async with await client.open_stream(config) as session:
                assert session.max_chunks_in_flight == 4
                for index in range(10):
                    await session.send_audio(b"\0\0" * 512, timestamp=index * 0.032)
                    assert session.in_flight <= 4
                await session.send_text("bad bytes")
                await session.send_text("Fine.")
                await session.end_input()
                events = [event async for event in session]

        stats = session.stats
        assert stats.modality(Modality.AUDIO).acked == 10
        assert stats.modality(Modality.TEXT).acked == 1
        assert stats.modality(Modality.TEXT).failed == 1
        assert stats.results_by_model == {"silero_vad": 10, "minilm_embedding": 1}
        assert len(stats.latencies_s()) == 12
        assert all(latency >= 0 for latency in stats.latencies_s())
        assert any(isinstance(event, ChunkFailed) and event.sequence_number == 1 for event in events)
        assert isinstance(events[-1], StreamEnded)
        assert fake_server.service.max_pending <= 4

    asyncio.run(scenario())


def test_stream_config_rejected(fake_server: FakeServer) -> None:
    async def scenario() -> None:
        async with AsyncClient(fake_server.target) as client:
            with pytest.raises(InvalidArgumentError, match="INVALID_ARGUMENT: the first message must be"):
                await client.open_stream(pb.StreamConfig())

    asyncio.run(scenario())


def test_sync_client_mirrors_async(fake_server: FakeServer) -> None:
    with SyncClient(fake_server.target) as client:
        assert [model.name for model in client.list_models()][:1] == ["silero_vad"]
        with pytest.raises(NotFoundError):
            client.get_model("nope")

        with client.open_stream(stream_config(["hog_people"])) as stream:
            sender_done = threading.Event()

            def send_frames() -> None:
                for _ in range(9):
                    stream.send_frame(b"\xff\xd8 not really a jpeg")
                stream.flush("video")
                stream.end_input()
                sender_done.set()

            sender = threading.Thread(target=send_frames)
            sender.start()
            results = list(stream.results())
            sender.join(timeout=10)

        assert sender_done.is_set()
        assert len(results) == 9
        assert [result.first_sequence_number for result in results] == list(range(1, 10))
        assert stream.stats.modality(Modality.VIDEO).acked == 9
        controls = [request.control for request in fake_server.service.stream_requests if request.HasField("control")]
        assert [(control.action, control.modality) for control in controls] == [
            (pb.CONTROL_ACTION_FLUSH, pb.MODALITY_VIDEO)
        ]


def test_sync_client_close_twice() -> None:
    client = SyncClient("127.0.0.1:1")

    client.close()
    client.close()


def test_channel_arguments_defaults() -> None:
    arguments = dict(channel_arguments(ClientOptions()))

    assert arguments["grpc.keepalive_time_ms"] == 30_000
    assert arguments["grpc.keepalive_permit_without_calls"] == 0
    assert arguments["grpc.max_send_message_length"] >= 8 * 1024 * 1024 + 1024
    assert arguments["grpc.max_receive_message_length"] >= 8 * 1024 * 1024 + 1024
    # The SDK retries calls itself, so the channel has no retry policy of its own.
    assert "grpc.service_config" not in arguments


def test_client_options_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="keepalive_time_s = 0"):
        ClientOptions(keepalive_time_s=0)
    with pytest.raises(ValueError, match="unary_timeout_s = 0"):
        ClientOptions(unary_timeout_s=0)
