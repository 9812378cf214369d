"""The server's error tree and its one mapping to gRPC status codes.

    StreaminferError
    ├── InvalidArgument      bad config or message; fix the request   (not retryable)
    ├── NotFound             unknown model                             (not retryable)
    ├── FailedPrecondition   message out of order, e.g. no config first (not retryable)
    ├── ResourceExhausted    a queue or limit is full                  (retryable later)
    └── Unavailable          shutting down or not ready                (retryable)

Stream-level errors end the call with the mapped status. Chunk-level problems
do not raise: they become a ChunkError message and the stream goes on.
"""

from __future__ import annotations

import grpc


class StreaminferError(Exception):
    """Base class. ``code`` is the gRPC status the call ends with."""

    code = grpc.StatusCode.INTERNAL
    retryable = False


class InvalidArgument(StreaminferError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(StreaminferError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(StreaminferError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(StreaminferError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True


class Unavailable(StreaminferError):
    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class ChunkRejected(Exception):
    """A chunk that cannot be processed; carries a pb.ChunkErrorReason value."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
