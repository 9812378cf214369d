"""The SDK package: its import footprint and its public surface."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import streaminfer.client

PUBLIC_NAMES = {
    "AlreadyExistsError", "AsyncClient", "AudioFormat", "CallCancelledError", "ChunkFailed", "ChunksAcked",
    "ClientOptions", "DEFAULT_TARGET", "DeadlineExceededError", "InternalError", "InvalidArgumentError",
    "MediaChunk", "Modality", "ModalityStats", "NotFoundError", "Pacer", "PermissionDeniedError",
    "RETRYABLE_CODES", "ResourceExhaustedError", "Result", "RetryPolicy", "RpcError", "StreamEnded",
    "StreamEvent", "StreamRolledOver", "StreamSession", "StreamState", "StreamStateError", "StreamStats",
    "StreaminferError", "SyncClient", "SyncStream", "UnavailableError", "UnimplementedError", "VideoFormat",
    "__version__", "iter_text_chunks", "iter_video_frames", "iter_wav_chunks", "paced", "paced_async",
    "percentile", "read_wav_format", "stream_config", "tls_credentials", "video_frame_rate",
}


def test_import_without_torch_or_opencv() -> None:
    code = (
        "import sys\n"
        "import streaminfer.client\n"
        "import streaminfer.client.cli\n"
        "assert 'torch' not in sys.modules, 'streaminfer.client imported torch'\n"
        "assert 'cv2' not in sys.modules, 'streaminfer.client imported cv2 at import time'\n"
        "assert 'numpy' not in sys.modules, 'streaminfer.client imported numpy'\n"
    )

    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert completed.returncode == 0, completed.stderr


def test_public_surface() -> None:
    assert set(streaminfer.client.__all__) == PUBLIC_NAMES
    for name in streaminfer.client.__all__:
        assert hasattr(streaminfer.client, name), name


def test_py_typed_marker() -> None:
    package_dir = pathlib.Path(streaminfer.client.__file__).parent

    assert (package_dir / "py.typed").is_file()
