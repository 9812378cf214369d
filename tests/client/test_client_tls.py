"""TLS with client certificates, through AsyncClient and the command line, against a fake loopback server."""

from __future__ import annotations

import asyncio
import io
import pathlib
import shutil
import subprocess

import grpc
import pytest
from client_fakes import FakeServer

from streaminfer.client import AsyncClient, RetryPolicy, UnavailableError, tls_credentials
from streaminfer.client.cli import main


def _openssl(*arguments: str | pathlib.Path) -> None:
    subprocess.run(["openssl", *map(str, arguments)], check=True, capture_output=True, timeout=60)


def _signed_certificate(directory: pathlib.Path, name: str, extensions: str) -> None:
    """Write NAME.key and NAME.pem, signed by ca.key, with the given X.509 v3 extensions."""
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", directory / f"{name}.key",
             "-subj", f"/CN={name}", "-out", directory / f"{name}.csr")
    (directory / f"{name}.ext").write_text(extensions, encoding="ascii")
    _openssl("x509", "-req", "-in", directory / f"{name}.csr", "-CA", directory / "ca.pem",
             "-CAkey", directory / "ca.key", "-CAcreateserial", "-days", "2",
             "-extfile", directory / f"{name}.ext", "-out", directory / f"{name}.pem")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, all in one directory."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make the test certificates")
    directory = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", directory / "ca.key",
             "-subj", "/CN=streaminfer test CA", "-days", "2", "-out", directory / "ca.pem")
    _signed_certificate(directory, "server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _signed_certificate(directory, "client", "extendedKeyUsage=clientAuth\n")
    return directory


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
