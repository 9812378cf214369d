"""TLS with client certificates, through AsyncClient and the command line, against a fake loopback server."""

from __future__ import annotations

import asyncio
import io
import logging
import pathlib

import grpc
import pytest
from certificates import make_certificates
from client_fakes import FakeServer

from streaminfer.client import AsyncClient, RetryPolicy, UnavailableError, tls_credentials
from streaminfer.client.cli import main


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, all in one directory."""
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(certificates: pathlib.Path):
    credentials = grpc.ssl_server_credentials(
        [((certificates / "server.key").read_bytes(), (certificates / "server.pem").read_bytes())],
        root_certificates=(certificates / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    with FakeServer(server_credentials=credentials) as server:
        yield server


def test_async_client_with_client_certificate(tls_server: FakeServer, certificates: pathlib.Path) -> None:
    credentials = tls_credentials(certificates / "ca.pem", certificates / "client.pem", certificates / "client.key")

    async def scenario() -> list[str]:
        async with AsyncClient(tls_server.target, credentials=credentials, api_key="tls-key") as client:
            return [model.name for model in await client.list_models()]

    assert asyncio.run(scenario())[0] == "silero_vad"
    assert tls_server.service.metadata["ListModels"][0]["x-api-key"] == "tls-key"


def test_missing_client_certificate_fails(tls_server: FakeServer, certificates: pathlib.Path) -> None:
    credentials = tls_credentials(certificates / "ca.pem")

    async def scenario() -> None:
        policy = RetryPolicy(max_attempts=1)
        async with AsyncClient(tls_server.target, credentials=credentials, retry_policy=policy) as client:
            await client.list_models(timeout=10)

    with pytest.raises(UnavailableError):
        asyncio.run(scenario())


def test_untrusted_certificate_not_retryable(tls_server: FakeServer, caplog: pytest.LogCaptureFixture) -> None:
    # gRPC's default roots do not include the test CA.
    credentials = tls_credentials()

    async def scenario() -> None:
        async with AsyncClient(tls_server.target, credentials=credentials) as client:
            await client.list_models(timeout=10)

    with caplog.at_level(logging.INFO, logger="streaminfer.client"), pytest.raises(UnavailableError) as caught:
        asyncio.run(scenario())

    assert not caught.value.retryable
    assert "CERTIFICATE_VERIFY_FAILED" in caught.value.details
    assert not any("retrying" in record.getMessage() for record in caplog.records)


def test_plaintext_to_tls_server_hints_credentials(
    tls_server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01)

    async def scenario() -> None:
        async with AsyncClient(tls_server.target, retry_policy=policy) as client:
            await client.list_models(timeout=10)

    with caplog.at_level(logging.INFO, logger="streaminfer.client"), pytest.raises(UnavailableError) as caught:
        asyncio.run(scenario())

    assert "Socket closed" in caught.value.details
    assert caught.value.retryable
    messages = [record.getMessage() for record in caplog.records]
    assert any("(attempt 1 of 2); retrying" in message for message in messages)
    [warning] = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert f"this client connects to {tls_server.target} without TLS" in warning
    assert "pass credentials=tls_credentials(...) to the client" in warning


def test_cli_with_client_certificate(
    tls_server: FakeServer, certificates: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = io.StringIO()

    status = main(
        [
            "models", "--target", tls_server.target, "--ca-file", str(certificates / "ca.pem"),
            "--cert-file", str(certificates / "client.pem"), "--key-file", str(certificates / "client.key"),
        ],
        out=out,
    )

    assert status == 0, capsys.readouterr().err
    assert out.getvalue().startswith("silero_vad")


def test_tls_credentials_reject_half_pair(certificates: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="needs both cert_file and key_file, but only cert_file was given"):
        tls_credentials(cert_file=certificates / "client.pem")


def test_tls_credentials_reject_missing_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="ca_file .*absent.pem' could not be read"):
        tls_credentials(tmp_path / "absent.pem")


def test_tls_credentials_reject_non_pem(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ca.pem"
    path.write_text("not a certificate", encoding="ascii")

    with pytest.raises(ValueError, match="is not a PEM file"):
        tls_credentials(path)
