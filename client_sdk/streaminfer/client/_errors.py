"""The SDK's exception tree and its one mapping from gRPC status codes.

::

    StreaminferError                 .code, .details, .retryable
    ├── RpcError                     the server or the channel ended a call
    │   ├── InvalidArgumentError     INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE
    │   ├── NotFoundError            NOT_FOUND
    │   ├── AlreadyExistsError       ALREADY_EXISTS
    │   ├── PermissionDeniedError    PERMISSION_DENIED, UNAUTHENTICATED
    │   ├── ResourceExhaustedError   RESOURCE_EXHAUSTED (retryable)
    │   ├── UnavailableError         UNAVAILABLE, ABORTED (retryable)
    │   ├── DeadlineExceededError    DEADLINE_EXCEEDED
    │   ├── CallCancelledError       CANCELLED
    │   ├── UnimplementedError       UNIMPLEMENTED
    │   └── InternalError            INTERNAL, UNKNOWN, DATA_LOSS
    └── StreamStateError             a stream method called in the wrong state

``RETRYABLE_CODES`` is the same table's retryable column. A call that ends
with trailing metadata ``grpc-retry-pushback-ms`` carries the server's retry
advice on the error: a wait in ``retry_pushback_s``, or ``retryable`` False when
the value is negative or unparsable. An UNAVAILABLE error from a failed TLS
handshake (an untrusted server certificate, for example) has ``retryable``
False too, since trying again fails the same way.
"""

from __future__ import annotations

import grpc

__all__ = [
    "AlreadyExistsError",
    "CallCancelledError",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "RETRYABLE_CODES",
    "ResourceExhaustedError",
    "RpcError",
    "StreamStateError",
    "StreaminferError",
    "UnavailableError",
    "UnimplementedError",
    "error_from_rpc_error",
    "is_tls_handshake_failure",
]


class StreaminferError(Exception):
    """Base class of every error the SDK raises.

    ``code`` is the gRPC status code, or None for errors raised in the client
    without a call ending. ``details`` is the server's message. ``retryable``
    is True when the same request may succeed if sent again later.
    ``retry_pushback_s`` is the wait in seconds the server asked for before a
    retry (``grpc-retry-pushback-ms``), or None when it sent none.
    """

    def __init__(
        self,
        details: str,
        code: grpc.StatusCode | None = None,
        *,
        retryable: bool = False,
        retry_pushback_s: float | None = None,
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.retryable = retryable
        self.retry_pushback_s = retry_pushback_s

    def __str__(self) -> str:
        if self.code is None:
            return self.details
        return f"{self.code.name}: {self.details}"


class RpcError(StreaminferError):
    """A call that ended with a non-OK gRPC status."""


class InvalidArgumentError(RpcError):
    """The server rejected the request's content, or a stream message out of order."""


class NotFoundError(RpcError):
    """The named model or resource does not exist."""


class AlreadyExistsError(RpcError):
    """The resource the request creates already exists."""


class PermissionDeniedError(RpcError):
    """The caller is not authenticated or not allowed to make the request."""


class ResourceExhaustedError(RpcError):
    """The server is at a limit (streams, queue size, message size); retry later."""


class UnavailableError(RpcError):
    """The server could not be reached or is shutting down; retry later."""


class DeadlineExceededError(RpcError):
    """The call ran past its deadline."""


class CallCancelledError(RpcError):
    """The call was cancelled, by the client or the server."""


class UnimplementedError(RpcError):
    """The server does not implement the method."""


class InternalError(RpcError):
    """The server failed while handling the request."""


class StreamStateError(StreaminferError):
    """A stream method was called in a state that does not allow it.

    For example ``send_audio`` after ``end_input``. The message names the
    expected and the actual state.
    """


# The one table from status code to exception class and retryability.
# DEADLINE_EXCEEDED is not retryable because the caller's own deadline ran out.
_ERRORS_BY_CODE: dict[grpc.StatusCode, tuple[type[RpcError], bool]] = {
    grpc.StatusCode.CANCELLED: (CallCancelledError, False),
    grpc.StatusCode.UNKNOWN: (InternalError, False),
    grpc.StatusCode.INVALID_ARGUMENT: (InvalidArgumentError, False),
    grpc.StatusCode.DEADLINE_EXCEEDED: (DeadlineExceededError, False),
    grpc.StatusCode.NOT_FOUND: (NotFoundError, False),
    grpc.StatusCode.ALREADY_EXISTS: (AlreadyExistsError, False),
    grpc.StatusCode.PERMISSION_DENIED: (PermissionDeniedError, False),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (ResourceExhaustedError, True),
    grpc.StatusCode.FAILED_PRECONDITION: (InvalidArgumentError, False),
    grpc.StatusCode.ABORTED: (UnavailableError, True),
    grpc.StatusCode.OUT_OF_RANGE: (InvalidArgumentError, False),
    grpc.StatusCode.UNIMPLEMENTED: (UnimplementedError, False),
    grpc.StatusCode.INTERNAL: (InternalError, False),
    grpc.StatusCode.UNAVAILABLE: (UnavailableError, True),
    grpc.StatusCode.DATA_LOSS: (InternalError, False),
    grpc.StatusCode.UNAUTHENTICATED: (PermissionDeniedError, False),
}

RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset(
    code for code, (_, retryable) in _ERRORS_BY_CODE.items() if retryable
)


PUSHBACK_METADATA_KEY = "grpc-retry-pushback-ms"

# Parts of grpc's UNAVAILABLE details when the TLS handshake failed, not the
# server: for example a server certificate that no trusted CA signed.
TLS_HANDSHAKE_FAILURES = ("CERTIFICATE_VERIFY_FAILED", "Ssl handshake failed", "SSL_ERROR_SSL")


def error_from_rpc_error(error: grpc.RpcError) -> RpcError:
    """Build the SDK exception for a failed call; the caller chains it with ``from``."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    cls, retryable = _ERRORS_BY_CODE.get(code, (InternalError, False))
    if code == grpc.StatusCode.UNAVAILABLE and is_tls_handshake_failure(details or ""):
        # The server is up, but the handshake fails the same way every time.
        retryable = False
    pushback = _pushback_value(error)
    pushback_s = None
    if pushback is not None:
        pushback_s = parse_pushback_s(pushback)
        if pushback_s is None:
            retryable = False
    return cls(details or "no details from the server", code, retryable=retryable, retry_pushback_s=pushback_s)


def is_tls_handshake_failure(details: str) -> bool:
    """Return True when ``details`` of an UNAVAILABLE status contain a TLS handshake failure marker."""
    return any(marker in details for marker in TLS_HANDSHAKE_FAILURES)


def parse_pushback_s(value: str | bytes) -> float | None:
    """Convert a ``grpc-retry-pushback-ms`` value to seconds; None for a negative or unparsable one.

    gRPC defines the value as a non-negative decimal integer of milliseconds,
    and anything else as the server asking for no retry.
    """
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    text = text.strip()
    if not text.isascii() or not text.isdigit():
        return None
    return int(text) / 1000


def _pushback_value(error: grpc.RpcError) -> str | bytes | None:
    trailing = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
    for key, value in trailing or ():
        if key.lower() == PUSHBACK_METADATA_KEY:
            return value
    return None
