"""Retries of unary calls and stream setup: backoff, jitter, server pushback, and where they stop."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from client_fakes import FakeServer, rpc_error

from streaminfer.client import (
    AsyncClient,
    InvalidArgumentError,
    Modality,
    ResourceExhaustedError,
    RetryPolicy,
    SyncClient,
    UnavailableError,
    stream_config,
)
from streaminfer.client._errors import error_from_rpc_error, parse_pushback_s
from streaminfer.client._retry import Retrier

PUSHBACK = "grpc-retry-pushback-ms"


class FakeSleep:
    """Records each wait and moves a fake clock by it, without sleeping."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.now = 1000.0

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def _retrier(policy: RetryPolicy, sleep: FakeSleep, fraction: float = 0.0) -> Retrier:
    return Retrier(policy, sleep=sleep, random_fraction=lambda: fraction, clock=sleep.clock)


def _client(target: str, sleep: FakeSleep, policy: RetryPolicy | None = None, **kwargs: object) -> AsyncClient:
    client = AsyncClient(target, retry_policy=policy, **kwargs)  # type: ignore[arg-type]
    client._retrier = Retrier(
        client.retry_policy, sleep=sleep, random_fraction=lambda: 0.0, clock=sleep.clock,
        failure_hint=client._failure_hint,
    )
    return client


class FailingThenOk:
    """An attempt that raises the given SDK errors first, then returns "ok"; records each timeout."""

    def __init__(self, *errors: grpc.aio.AioRpcError) -> None:
        self.errors = list(errors)
        self.timeouts: list[float | None] = []

    async def __call__(self, timeout: float | None) -> str:
        self.timeouts.append(timeout)
        if self.errors:
            raise error_from_rpc_error(self.errors.pop(0))
        return "ok"


def _unavailable(pushback: str | None = None) -> grpc.aio.AioRpcError:
    trailing = ((PUSHBACK, pushback),) if pushback is not None else ()
    return rpc_error(grpc.StatusCode.UNAVAILABLE, "the server is overloaded", trailing)


# The policy and the pushback value


def test_policy_backoff_grows_to_max() -> None:
    policy = RetryPolicy(max_attempts=8, initial_backoff_s=0.5, max_backoff_s=3.0, backoff_multiplier=2.0)

    assert [policy.backoff_s(retry) for retry in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_policy_defaults() -> None:
    policy = RetryPolicy()

    assert policy.max_attempts == 5
    assert policy.initial_backoff_s == 0.2
    assert policy.max_backoff_s == 10.0
    assert policy.backoff_multiplier == 2.0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"max_attempts": 0}, "max_attempts = 0 is invalid"),
        ({"initial_backoff_s": 0}, "initial_backoff_s = 0 is invalid"),
        ({"max_backoff_s": 0.1}, "max_backoff_s = 0.1 is invalid"),
        ({"backoff_multiplier": 0.5}, "backoff_multiplier = 0.5 is invalid"),
        ({"initial_backoff_s": float("nan")}, "initial_backoff_s = nan is invalid"),
    ],
)
def test_policy_rejects_bad_values(arguments: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("250", 0.25), ("0", 0.0), (" 1500 ", 1.5), (b"40", 0.04),
        ("-1", None), ("soon", None), ("1.5", None), ("", None),
    ],
)
def test_parse_pushback(value: str | bytes, expected: float | None) -> None:
    assert parse_pushback_s(value) == expected


def test_error_carries_pushback() -> None:
    with_wait = error_from_rpc_error(_unavailable("750"))
    no_retry = error_from_rpc_error(_unavailable("-1"))
    without = error_from_rpc_error(_unavailable())

    assert with_wait.retry_pushback_s == 0.75
    assert with_wait.retryable
    assert no_retry.retry_pushback_s is None
    assert not no_retry.retryable
    assert without.retry_pushback_s is None
    assert without.retryable


TLS_FAILURE = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:50051: Tls handshake failed "
    "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: "
    "unable to get local issuer certificate"
)
SOCKET_CLOSED = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:50051: Socket closed"


@pytest.mark.parametrize(
    "details",
    [TLS_FAILURE, "Ssl handshake failed: SSL_ERROR_SSL", "handshake: CERTIFICATE_VERIFY_FAILED"],
)
def test_tls_handshake_failure_not_retryable(details: str) -> None:
    error = error_from_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE, details))

    assert isinstance(error, UnavailableError)
    assert not error.retryable


def test_other_unavailable_stays_retryable() -> None:
    assert error_from_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE, SOCKET_CLOSED)).retryable
    assert error_from_rpc_error(_unavailable()).retryable


def test_tls_handshake_failure_not_retried() -> None:
    sleep = FakeSleep()
    attempt = FailingThenOk(rpc_error(grpc.StatusCode.UNAVAILABLE, TLS_FAILURE))

    with pytest.raises(UnavailableError) as caught:
        asyncio.run(_retrier(RetryPolicy(), sleep).run(attempt, name="ListModels"))

    assert not caught.value.retryable
    assert sleep.waits == []
    assert len(attempt.timeouts) == 1


def test_tls_failure_marked_retryable_not_retried() -> None:
    # An error built by hand may have retryable True, so the retrier checks the details too.
    error = UnavailableError(TLS_FAILURE, grpc.StatusCode.UNAVAILABLE, retryable=True)

    assert _retrier(RetryPolicy(), FakeSleep()).wait_s(error, 1) is None


# The retry loop


def test_backoff_waits_with_jitter() -> None:
    sleep = FakeSleep()
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.2, max_backoff_s=10.0)
    attempt = FailingThenOk(_unavailable(), _unavailable(), _unavailable())

    # A random fraction of 1 gives the largest jitter: half the computed backoff.
    result = asyncio.run(_retrier(policy, sleep, fraction=1.0).run(attempt, name="ListModels"))

    assert result == "ok"
    assert sleep.waits == pytest.approx([0.1, 0.2, 0.4])
    assert attempt.timeouts == [None] * 4


def test_backoff_waits_without_jitter() -> None:
    sleep = FakeSleep()
    attempt = FailingThenOk(_unavailable(), _unavailable())

    asyncio.run(_retrier(RetryPolicy(), sleep, fraction=0.0).run(attempt, name="ListModels"))

    assert sleep.waits == pytest.approx([0.2, 0.4])


def test_pushback_replaces_backoff() -> None:
    sleep = FakeSleep()
    attempt = FailingThenOk(
        _unavailable("1500"),
        rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "over the rate limit", ((PUSHBACK, "300"),)),
        _unavailable(),
    )

    asyncio.run(_retrier(RetryPolicy(), sleep, fraction=0.0).run(attempt, name="Stream setup"))

    assert sleep.waits == pytest.approx([1.5, 0.3, 0.8])


@pytest.mark.parametrize("pushback", ["-1", "later"])
def test_pushback_forbids_retry(pushback: str) -> None:
    sleep = FakeSleep()
    attempt = FailingThenOk(_unavailable(pushback))

    with pytest.raises(UnavailableError):
        asyncio.run(_retrier(RetryPolicy(), sleep).run(attempt, name="Infer"))

    assert sleep.waits == []
    assert len(attempt.timeouts) == 1


def test_other_codes_not_retried() -> None:
    sleep = FakeSleep()
    attempt = FailingThenOk(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "bad config"))

    with pytest.raises(InvalidArgumentError):
        asyncio.run(_retrier(RetryPolicy(), sleep).run(attempt, name="Stream setup"))

    assert sleep.waits == []


def test_aborted_not_retried() -> None:
    sleep = FakeSleep()
    attempt = FailingThenOk(rpc_error(grpc.StatusCode.ABORTED, "conflict"))

    with pytest.raises(UnavailableError):
        asyncio.run(_retrier(RetryPolicy(), sleep).run(attempt, name="Infer"))

    assert sleep.waits == []


def test_attempts_run_out() -> None:
    sleep = FakeSleep()
    attempt = FailingThenOk(*[_unavailable()] * 5)

    with pytest.raises(UnavailableError):
        asyncio.run(_retrier(RetryPolicy(max_attempts=3), sleep).run(attempt, name="Infer"))

    assert len(attempt.timeouts) == 3
    assert len(sleep.waits) == 2


def test_one_attempt_turns_retries_off() -> None:
    sleep = FakeSleep()
    attempt = FailingThenOk(_unavailable("10"))

    with pytest.raises(UnavailableError):
        asyncio.run(_retrier(RetryPolicy(max_attempts=1), sleep).run(attempt, name="Infer"))

    assert sleep.waits == []


def test_deadline_bounds_attempts_and_waits() -> None:
    sleep = FakeSleep()
    retrier = _retrier(RetryPolicy(), sleep)
    attempt = FailingThenOk(_unavailable("400"), _unavailable("400"), _unavailable("400"))

    async def scenario() -> None:
        await retrier.run(attempt, name="Infer", deadline=retrier.deadline(1.0))

    with pytest.raises(UnavailableError):
        asyncio.run(scenario())

    # 0.4 s and 0.4 s fit in the 1 s deadline; a third wait would end past it.
    assert sleep.waits == pytest.approx([0.4, 0.4])
    assert attempt.timeouts == pytest.approx([1.0, 0.6, 0.2])


def test_retry_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    sleep = FakeSleep()
    attempt = FailingThenOk(_unavailable("250"))

    with caplog.at_level(logging.INFO, logger="streaminfer.client._retry"):
        asyncio.run(_retrier(RetryPolicy(), sleep).run(attempt, name="Stream setup"))

    [record] = caplog.records
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert "Stream setup failed with UNAVAILABLE (attempt 1 of 5)" in message
    assert "retrying in 0.250 s as the server requested" in message


def test_failure_hint_ends_the_warning(caplog: pytest.LogCaptureFixture) -> None:
    sleep = FakeSleep()
    retrier = Retrier(
        RetryPolicy(max_attempts=1), sleep=sleep, clock=sleep.clock, failure_hint=lambda error: "try this"
    )
    attempt = FailingThenOk(_unavailable())

    with caplog.at_level(logging.WARNING, logger="streaminfer.client._retry"), pytest.raises(UnavailableError):
        asyncio.run(retrier.run(attempt, name="Infer"))

    [record] = caplog.records
    assert record.getMessage() == "Infer failed after 1 attempt(s): UNAVAILABLE: the server is overloaded; try this"


def test_plaintext_socket_closed_hints_tls(caplog: pytest.LogCaptureFixture) -> None:
    sleep = FakeSleep()
    client = _client("127.0.0.1:50051", sleep, RetryPolicy(max_attempts=3))
    attempt = FailingThenOk(*[rpc_error(grpc.StatusCode.UNAVAILABLE, SOCKET_CLOSED)] * 6)

    async def scenario() -> None:
        await client._retrier.run(attempt, name="ListModels")

    with caplog.at_level(logging.WARNING, logger="streaminfer.client._retry"):
        with pytest.raises(UnavailableError) as caught:
            asyncio.run(scenario())
        # Retried as before: a restarting server closes sockets too.
        assert len(attempt.timeouts) == 3
        assert caught.value.retryable
        with pytest.raises(UnavailableError):
            asyncio.run(scenario())

    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2
    assert warnings[0].startswith("ListModels failed after 3 attempt(s): UNAVAILABLE: ")
    assert "Socket closed; this client connects to 127.0.0.1:50051 without TLS" in warnings[0]
    assert "pass credentials=tls_credentials(...) to the client" in warnings[0]
    # Once per client: the next failure is logged without the advice.
    assert warnings[1] == f"ListModels failed after 3 attempts: UNAVAILABLE: {SOCKET_CLOSED}"


def test_tls_client_gets_no_plaintext_hint() -> None:
    client = AsyncClient("127.0.0.1:50051", credentials=grpc.ssl_channel_credentials())
    plaintext = AsyncClient("127.0.0.1:50051")
    socket_closed = error_from_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE, SOCKET_CLOSED))
    overloaded = error_from_rpc_error(_unavailable())

    assert client._failure_hint(socket_closed) == ""
    assert plaintext._failure_hint(overloaded) == ""
    assert "tls_credentials" in plaintext._failure_hint(socket_closed)


# Through the client, against a fake server


@pytest.fixture
def fake_server():
    with FakeServer(window=4) as server:
        yield server


def test_unary_retried_with_pushback(fake_server: FakeServer) -> None:
    fake_server.service.reject("ListModels", grpc.StatusCode.UNAVAILABLE, pushback="250", times=2)
    sleep = FakeSleep()

    async def scenario() -> list[str]:
        async with _client(fake_server.target, sleep) as client:
            return [model.name for model in await client.list_models()]

    names = asyncio.run(scenario())

    assert names[0] == "silero_vad"
    assert sleep.waits == [0.25, 0.25]
    assert len(fake_server.service.metadata["ListModels"]) == 3


def test_unary_resource_exhausted_without_pushback(fake_server: FakeServer) -> None:
    fake_server.service.reject("Infer", grpc.StatusCode.RESOURCE_EXHAUSTED)
    sleep = FakeSleep()

    async def scenario() -> None:
        async with _client(fake_server.target, sleep) as client:
            await client.infer("minilm_embedding", text="Hi.")

    asyncio.run(scenario())

    # The computed backoff, with the random fraction 0 of FakeSleep's retrier: no jitter.
    assert sleep.waits == [0.2]


def test_unary_not_retried_when_pushback_negative(fake_server: FakeServer) -> None:
    fake_server.service.reject("GetModel", grpc.StatusCode.RESOURCE_EXHAUSTED, pushback="-1")
    sleep = FakeSleep()

    async def scenario() -> None:
        async with _client(fake_server.target, sleep) as client:
            await client.get_model("silero_vad")

    with pytest.raises(ResourceExhaustedError) as caught:
        asyncio.run(scenario())

    assert not caught.value.retryable
    assert sleep.waits == []
    assert len(fake_server.service.metadata["GetModel"]) == 1


def test_stream_setup_retried(fake_server: FakeServer) -> None:
    fake_server.service.reject("Stream", grpc.StatusCode.UNAVAILABLE, pushback="1000")
    fake_server.service.reject("Stream", grpc.StatusCode.RESOURCE_EXHAUSTED, pushback="500")
    sleep = FakeSleep()

    async def scenario() -> int:
        async with _client(fake_server.target, sleep) as client:
            async with await client.open_stream(stream_config(["minilm_embedding"])) as session:
                await session.send_text("One sentence.")
                await session.end_input()
                [event async for event in session]
        return session.stats.modality(Modality.TEXT).acked

    acked = asyncio.run(scenario())

    assert sleep.waits == [1.0, 0.5]
    assert len(fake_server.service.metadata["Stream"]) == 3
    assert acked == 1


def test_stream_setup_gives_up(fake_server: FakeServer) -> None:
    fake_server.service.reject("Stream", grpc.StatusCode.UNAVAILABLE, times=5)
    sleep = FakeSleep()

    async def scenario() -> None:
        async with _client(fake_server.target, sleep, RetryPolicy(max_attempts=3)) as client:
            await client.open_stream(stream_config(["minilm_embedding"]))

    with pytest.raises(UnavailableError):
        asyncio.run(scenario())

    assert len(sleep.waits) == 2
    assert len(fake_server.service.metadata["Stream"]) == 3


def test_stream_not_retried_after_accept(fake_server: FakeServer) -> None:
    fake_server.service.fail_stream_after_first_chunk = grpc.StatusCode.UNAVAILABLE
    sleep = FakeSleep()

    async def scenario() -> None:
        async with _client(fake_server.target, sleep) as client:
            async with await client.open_stream(stream_config(["minilm_embedding"])) as session:
                await session.send_text("One sentence.")
                async for _ in session:
                    pass

    with pytest.raises(UnavailableError, match="the fake server failed the stream"):
        asyncio.run(scenario())

    assert sleep.waits == []
    assert len(fake_server.service.metadata["Stream"]) == 1


def test_api_key_on_every_call(fake_server: FakeServer) -> None:
    fake_server.service.reject("ListModels", grpc.StatusCode.UNAVAILABLE, pushback="0")
    sleep = FakeSleep()

    async def scenario() -> None:
        async with _client(fake_server.target, sleep, api_key="key-123") as client:
            await client.list_models()
            await client.infer("minilm_embedding", text="Hi.")
            async with await client.open_stream(stream_config(["minilm_embedding"])) as session:
                await session.end_input()
                [event async for event in session]

    asyncio.run(scenario())

    metadata_by_method = fake_server.service.metadata
    calls = [metadata for method in ("ListModels", "Infer", "Stream") for metadata in metadata_by_method[method]]
    assert len(calls) == 4
    assert [metadata.get("x-api-key") for metadata in calls] == ["key-123"] * 4


def test_sync_client_takes_policy_and_key(fake_server: FakeServer) -> None:
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01)

    with SyncClient(fake_server.target, api_key="sync-key", retry_policy=policy) as client:
        fake_server.service.reject("ListModels", grpc.StatusCode.UNAVAILABLE, times=2)
        with pytest.raises(UnavailableError):
            client.list_models()
        assert client.retry_policy is policy

    assert [metadata["x-api-key"] for metadata in fake_server.service.metadata["ListModels"]] == ["sync-key"] * 2


@pytest.mark.parametrize("key", ["", " padded "])
def test_api_key_rejects_blank(key: str) -> None:
    with pytest.raises(ValueError, match="api_key is invalid"):
        AsyncClient("127.0.0.1:1", api_key=key)


def test_api_key_without_tls_warns_off_loopback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="streaminfer.client._client"):
        AsyncClient("127.0.0.1:50051", api_key="k")
        AsyncClient("[::1]", api_key="k")
        AsyncClient("localhost", api_key="k")
        AsyncClient("inference.example:50051", api_key="k")

    assert [record.getMessage() for record in caplog.records] == [
        "the API key will be sent to inference.example:50051 without TLS, readable by anyone on the network path"
    ]
