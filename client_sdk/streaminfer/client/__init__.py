"""Client SDK for the streaminfer realtime inference server.

``AsyncClient`` is the asyncio client and ``SyncClient`` the blocking one; both
retry calls the server rejects for load, and open stream sessions that number
chunks, keep to the server's in-flight window, measure per-chunk latency and,
on request, roll over to a new stream when the server ends one. ``stream_config`` builds a stream's first
message, and the media readers cut WAV, video and text files into chunks.
"""

from streaminfer.client._client import AsyncClient
from streaminfer.client._config import AudioFormat, Modality, VideoFormat, stream_config
from streaminfer.client._errors import (
    RETRYABLE_CODES,
    AlreadyExistsError,
    CallCancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RpcError,
    StreaminferError,
    StreamStateError,
    UnavailableError,
    UnimplementedError,
)
from streaminfer.client._events import ChunkFailed, ChunksAcked, Result, StreamEnded, StreamEvent, StreamRolledOver
from streaminfer.client._media import (
    MediaChunk,
    iter_text_chunks,
    iter_video_frames,
    iter_wav_chunks,
    read_wav_format,
    video_frame_rate,
)
from streaminfer.client._options import DEFAULT_TARGET, ClientOptions, tls_credentials
from streaminfer.client._pacing import Pacer, paced, paced_async
from streaminfer.client._retry import RetryPolicy
from streaminfer.client._session import StreamSession, StreamState
from streaminfer.client._sync import SyncClient, SyncStream
from streaminfer.client._tracker import ModalityStats, StreamStats, percentile
from streaminfer.client._version import __version__

__all__ = [
    "AlreadyExistsError",
    "AsyncClient",
    "AudioFormat",
    "CallCancelledError",
    "ChunkFailed",
    "ChunksAcked",
    "ClientOptions",
    "DEFAULT_TARGET",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "MediaChunk",
    "Modality",
    "ModalityStats",
    "NotFoundError",
    "Pacer",
    "PermissionDeniedError",
    "RETRYABLE_CODES",
    "ResourceExhaustedError",
    "Result",
    "RetryPolicy",
    "RpcError",
    "StreamEnded",
    "StreamEvent",
    "StreamRolledOver",
    "StreamSession",
    "StreamState",
    "StreamStateError",
    "StreamStats",
    "StreaminferError",
    "SyncClient",
    "SyncStream",
    "UnavailableError",
    "UnimplementedError",
    "VideoFormat",
    "__version__",
    "iter_text_chunks",
    "iter_video_frames",
    "iter_wav_chunks",
    "paced",
    "paced_async",
    "percentile",
    "read_wav_format",
    "stream_config",
    "tls_credentials",
    "video_frame_rate",
]
