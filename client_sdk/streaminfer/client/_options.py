"""Client options, TLS credentials and the gRPC channel they build."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import grpc

from streaminfer.client._version import __version__

__all__ = ["API_KEY_METADATA_KEY", "ClientOptions", "DEFAULT_TARGET", "tls_credentials"]

DEFAULT_PORT = 50051
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"
# The call metadata key the server reads the API key from.
API_KEY_METADATA_KEY = "x-api-key"

_MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class ClientOptions:
    """Channel and call settings of a client.

    The defaults suit a server with the default limits: an 8 MiB video frame
    fits in one message with room for the envelope.
    """

    # Seconds between HTTP/2 keepalive pings while calls are open. Pings
    # notice a dead connection during a quiet stream; none are sent without
    # open calls. A server must allow pings this often (its minimum ping
    # interval) or it closes the connection with "too_many_pings".
    keepalive_time_s: float = 30.0
    # Seconds to wait for a ping's acknowledgement before the connection counts as dead.
    keepalive_timeout_s: float = 10.0
    # Largest message the client sends or receives, in bytes.
    max_message_bytes: int = 16 * _MIB
    # Deadline of unary calls (infer, list_models, get_model) in seconds,
    # retries and the waits between them included; None for no deadline.
    # Streams have no deadline unless open_stream sets one. Retries follow the
    # client's RetryPolicy.
    unary_timeout_s: float | None = 30.0
    # Metadata sent with every call, for example a tracing header. The client's
    # api_key argument adds x-api-key.
    metadata: tuple[tuple[str, str], ...] = ()
    # More channel arguments, appended after the ones above so they win.
    channel_arguments: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.keepalive_time_s <= 0:
            raise ValueError(f"keepalive_time_s = {self.keepalive_time_s!r} is invalid: expected seconds > 0")
        if self.keepalive_timeout_s <= 0:
            raise ValueError(f"keepalive_timeout_s = {self.keepalive_timeout_s!r} is invalid: expected seconds > 0")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes = {self.max_message_bytes!r} is invalid: expected bytes >= 1024")
        if self.unary_timeout_s is not None and self.unary_timeout_s <= 0:
            raise ValueError(f"unary_timeout_s = {self.unary_timeout_s!r} is invalid: expected seconds > 0 or None")


def channel_arguments(options: ClientOptions) -> Sequence[tuple[str, Any]]:
    """Build the channel arguments for ``grpc.aio.insecure_channel`` and ``secure_channel``."""
    arguments: list[tuple[str, Any]] = [
        ("grpc.keepalive_time_ms", int(options.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(options.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.max_send_message_length", options.max_message_bytes),
        ("grpc.max_receive_message_length", options.max_message_bytes),
        ("grpc.primary_user_agent", f"streaminfer-client/{__version__}"),
    ]
    arguments.extend(options.channel_arguments)
    return arguments


def tls_credentials(
    ca_file: str | pathlib.Path | None = None,
    cert_file: str | pathlib.Path | None = None,
    key_file: str | pathlib.Path | None = None,
) -> grpc.ChannelCredentials:
    """Build TLS channel credentials from PEM files.

    ``ca_file`` contains the certificates that may sign the server's
    certificate; None trusts gRPC's default roots. ``cert_file`` and ``key_file`` are the
    client certificate chain and its private key, for a server that requires
    client certificates; give both or neither. Raises ValueError for a file
    that is missing, unreadable or not PEM.
    """
    if (cert_file is None) != (key_file is None):
        present = "cert_file" if cert_file is not None else "key_file"
        raise ValueError(f"a client certificate needs both cert_file and key_file, but only {present} was given")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca_file, "ca_file"),
        private_key=_read_pem(key_file, "key_file"),
        certificate_chain=_read_pem(cert_file, "cert_file"),
    )


def _read_pem(path: str | pathlib.Path | None, name: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{name} {str(path)!r} could not be read: {error.strerror or error}") from error
    if b"-----BEGIN " not in data:
        raise ValueError(f"{name} {str(path)!r} is not a PEM file: expected a -----BEGIN ...----- block")
    return data


def create_channel(
    target: str, options: ClientOptions, credentials: grpc.ChannelCredentials | None
) -> grpc.aio.Channel:
    """Open a channel on the running event loop; TLS when ``credentials`` is given."""
    arguments = channel_arguments(options)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=arguments)
    return grpc.aio.secure_channel(target, credentials, options=arguments)
