"""Client options and the gRPC channel they build."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import grpc

from streaminfer.client._errors import RETRYABLE_CODES
from streaminfer.client._version import __version__

__all__ = ["ClientOptions", "DEFAULT_TARGET"]

DEFAULT_PORT = 50051
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"

_SERVICE = "streaminfer.v1.InferenceService"
_UNARY_METHODS = ("Infer", "ListModels", "GetModel")
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
    # Deadline of unary calls (infer, list_models, get_model) in seconds;
    # None for no deadline. Streams have no deadline unless open_stream sets one.
    unary_timeout_s: float | None = 30.0
    # Attempts per unary call, counting the first. Failed attempts with a
    # retryable status are retried by gRPC with exponential backoff; 1 turns
    # retries off. Streams are never retried.
    unary_max_attempts: int = 3
    # Metadata sent with every call, for example an authorization header.
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
        # gRPC caps attempts at 5 and ignores larger values silently.
        if not 1 <= self.unary_max_attempts <= 5:
            raise ValueError(f"unary_max_attempts = {self.unary_max_attempts!r} is invalid: expected 1 to 5")


def service_config_json(options: ClientOptions) -> str:
    """Build the gRPC service config that retries unary calls on retryable codes."""
    method_config: dict[str, Any] = {
        "name": [{"service": _SERVICE, "method": method} for method in _UNARY_METHODS],
    }
    if options.unary_max_attempts > 1:
        method_config["retryPolicy"] = {
            "maxAttempts": options.unary_max_attempts,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": sorted(code.name for code in RETRYABLE_CODES),
        }
    return json.dumps({"methodConfig": [method_config]})


def channel_arguments(options: ClientOptions) -> Sequence[tuple[str, Any]]:
    """Build the channel arguments for ``grpc.aio.insecure_channel`` and ``secure_channel``."""
    arguments: list[tuple[str, Any]] = [
        ("grpc.keepalive_time_ms", int(options.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(options.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.max_send_message_length", options.max_message_bytes),
        ("grpc.max_receive_message_length", options.max_message_bytes),
        ("grpc.enable_retries", 1 if options.unary_max_attempts > 1 else 0),
        ("grpc.service_config", service_config_json(options)),
        ("grpc.primary_user_agent", f"streaminfer-client/{__version__}"),
    ]
    arguments.extend(options.channel_arguments)
    return arguments


def create_channel(
    target: str, options: ClientOptions, credentials: grpc.ChannelCredentials | None
) -> grpc.aio.Channel:
    """Open a channel on the running event loop; TLS when ``credentials`` is given."""
    arguments = channel_arguments(options)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=arguments)
    return grpc.aio.secure_channel(target, credentials, options=arguments)
