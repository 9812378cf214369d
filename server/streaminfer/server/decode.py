"""Decoding of client chunks, and the stage that runs it off the event loop.

The decode functions turn wire bytes into the arrays models read; they raise
ChunkRejected with a message naming the field and value. DecodeStage runs
them, and the models' preprocess steps, in a bounded thread pool. It hands the
pool many small jobs in one call, because one thread hop per 32 ms audio
chunk would cost more than the decoding itself.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from streaminfer.server.errors import ChunkRejected
from streaminfer.v1 import streaminfer_pb2 as pb

logger = logging.getLogger(__name__)

INVALID = pb.CHUNK_ERROR_REASON_INVALID_ARGUMENT
DECODE_FAILED = pb.CHUNK_ERROR_REASON_DECODE_FAILED
TOO_LARGE = pb.CHUNK_ERROR_REASON_TOO_LARGE

_SAMPLE_BYTES = {pb.AUDIO_ENCODING_LINEAR16: 2, pb.AUDIO_ENCODING_FLOAT32: 4}


def decode_audio(content: bytes, encoding: int, channels: int) -> np.ndarray:
    """Return float32 mono samples in [-1, 1] from interleaved PCM bytes."""
    frame_bytes = _SAMPLE_BYTES[encoding] * channels
    if len(content) % frame_bytes:
        name = pb.AudioEncoding.Name(encoding)
        raise ChunkRejected(
            INVALID,
            f"audio.audio_content has {len(content)} bytes, not a multiple of {frame_bytes} "
            f"({name}, {channels} channel(s)); send whole samples",
        )
    if encoding == pb.AUDIO_ENCODING_LINEAR16:
        samples = np.frombuffer(content, dtype="<i2").astype(np.float32) * (1.0 / 32768.0)
    else:
        samples = np.frombuffer(content, dtype="<f4").astype(np.float32)
        if not np.isfinite(samples).all():
            raise ChunkRejected(INVALID, "audio.audio_content contains NaN or infinite FLOAT32 samples")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return samples


def decode_image(content: bytes, video_format: pb.VideoFormat, max_dimension: int) -> np.ndarray:
    """Return an H x W x 3 uint8 BGR image."""
    encoding = video_format.encoding
    if encoding in (pb.IMAGE_ENCODING_RAW_RGB24, pb.IMAGE_ENCODING_RAW_BGR24):
        width, height = video_format.width, video_format.height
        expected = width * height * 3
        if len(content) != expected:
            raise ChunkRejected(
                INVALID,
                f"frame.image_content has {len(content)} bytes, expected {expected} "
                f"({width} x {height} x 3 for {pb.ImageEncoding.Name(encoding)})",
            )
        image = np.frombuffer(content, dtype=np.uint8).reshape(height, width, 3)
        if encoding == pb.IMAGE_ENCODING_RAW_RGB24:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        return image

    image = cv2.imdecode(np.frombuffer(content, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ChunkRejected(
            DECODE_FAILED,
            f"frame.image_content ({len(content)} bytes) is not a valid "
            f"{pb.ImageEncoding.Name(encoding).removeprefix('IMAGE_ENCODING_')} image",
        )
    height, width = image.shape[:2]
    if max(height, width) > max_dimension:
        raise ChunkRejected(
            TOO_LARGE,
            f"frame is {width} x {height} pixels, larger than the limit of {max_dimension} per side; scale it down",
        )
    return image


class TextDecoder:
    """Incremental UTF-8 decoding, so a character split across chunks is kept whole."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")

    def decode(self, content: bytes, final: bool = False) -> str:
        try:
            return self._decoder.decode(content, final)
        except UnicodeDecodeError as error:
            self._decoder.reset()
            raise ChunkRejected(
                DECODE_FAILED,
                f"text.text is not valid UTF-8: byte 0x{error.object[error.start]:02x} at offset {error.start} "
                f"({error.reason}); send UTF-8 encoded text",
            ) from None


@dataclasses.dataclass(slots=True)
class _Job:
    function: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]


@dataclasses.dataclass(slots=True)
class DecodeStats:
    jobs: int = 0
    pool_calls: int = 0
    busy_seconds: float = 0.0


class DecodeStage:
    """Runs decode and preprocess jobs in a thread pool, many per thread hop.

    ``max_queue_size`` bounds the jobs waiting for the pool; a reader that
    finds the queue full waits, which stops it reading its stream.
    """

    # Jobs handed to the pool in one call. Large enough to amortise the hop at
    # thousands of chunks per second, small enough that one slow image decode
    # does not hold many audio chunks behind it.
    MAX_JOBS_PER_CALL = 32

    def __init__(self, threads: int, max_queue_size: int = 4096) -> None:
        self._threads = threads
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="streaminfer-decode")
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(max_queue_size)
        self._workers: list[asyncio.Task[None]] = []
        self.stats = DecodeStats()

    def start(self) -> None:
        for index in range(self._threads):
            self._workers.append(asyncio.create_task(self._work(), name=f"decode-worker-{index}"))

    async def aclose(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function(*args)`` in the pool and return its result or raise its error."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(function, args, future))
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            while len(jobs) < self.MAX_JOBS_PER_CALL and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            outcomes = await loop.run_in_executor(self._pool, self._run_jobs, jobs)
            for job, (ok, value) in zip(jobs, outcomes):
                if job.future.done():
                    continue  # the waiting reader was cancelled
                if ok:
                    job.future.set_result(value)
                else:
                    job.future.set_exception(value)

    def _run_jobs(self, jobs: list[_Job]) -> list[tuple[bool, Any]]:
        started = time.perf_counter()
        outcomes: list[tuple[bool, Any]] = []
        for job in jobs:
            try:
                outcomes.append((True, job.function(*job.args)))
            except Exception as error:  # each job's error goes to its own caller
                outcomes.append((False, error))
        self.stats.jobs += len(jobs)
        self.stats.pool_calls += 1
        self.stats.busy_seconds += time.perf_counter() - started
        return outcomes
