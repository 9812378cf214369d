"""Test certificates made with the openssl command: a CA, a server certificate for 127.0.0.1 and a client one."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest


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


def make_certificates(directory: pathlib.Path) -> pathlib.Path:
    """Write ca.pem, server.pem and client.pem with their keys into ``directory`` and return it.

    Skips the calling test when the openssl command is not installed.
    """
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make the test certificates")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", directory / "ca.key",
             "-subj", "/CN=streaminfer test CA", "-days", "2", "-out", directory / "ca.pem")
    _signed_certificate(directory, "server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _signed_certificate(directory, "client", "extendedKeyUsage=clientAuth\n")
    return directory
