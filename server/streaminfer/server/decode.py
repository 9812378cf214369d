"""Decoding of client chunks, and the stage that runs it off the event loop.

The decode functions turn wire bytes into the arrays models read; they raise
ChunkRejected with a message naming the field and value. DecodeStage runs
them, and the models' preprocess steps, on its own threads, so the event loop
only reads, validates and routes messages.
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import cv2
import numpy as np

from streaminfer.server.errors import ChunkRejected
from streaminfer.v1 import streaminfer_pb2 as pb

logger = logging.getLogger(__name__)

T = TypeVar("T")

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
class DecodeStats:
    jobs: int = 0
    hand_offs: int = 0
    failed_jobs: int = 0
    busy_seconds: float = 0.0


class DecodeStage:
    """Threads that decode and preprocess chunks, each stream pinned to one thread.

    Pinning keeps a stream's chunks in order without any per-chunk await on
    the event loop: the reader drops a job in its lane's queue and moves on,
    and the decode thread submits the model inputs to the runners itself.

    Streams with video are spread over all threads, because OpenCV releases
    the GIL while it decodes an image, so frames decode in parallel. Streams
    of audio and text share the first thread: their decoding holds the GIL
    (small numpy operations and Python), so a second thread cannot run it in
    parallel and only adds wake-ups and GIL hand-overs. On 2 cores, 200
    real-time VAD streams had a p99 chunk latency of 88 to 112 ms spread over
    two threads and 66 to 84 ms on one (three alternating runs each).

    A lane's queue contains at most ``max_chunks_in_flight`` jobs per stream,
    because a stream's reader stops at its in-flight window. Flush and
    end-of-input jobs add at most one more per stream.
    """

    def __init__(self, threads: int) -> None:
        self._lanes: list[queue.SimpleQueue[list[Callable[[], None]] | None]] = [
            queue.SimpleQueue() for _ in range(threads)
        ]
        # Jobs submitted during the current event-loop iteration, per lane.
        # They go to the lane in one hand-off, so a busy loop wakes each
        # decode thread once per iteration instead of once per chunk.
        self._pending: list[list[Callable[[], None]]] = [[] for _ in range(threads)]
        self._hand_off_scheduled = False
        self._threads = [
            threading.Thread(target=self._work, args=(lane,), name=f"streaminfer-decode-{index}", daemon=True)
            for index, lane in enumerate(self._lanes)
        ]
        self._next_lane = itertools.count()
        self.stats = DecodeStats()

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    async def aclose(self) -> None:
        for lane in self._lanes:
            lane.put(None)
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 30)

    @property
    def queue_depth(self) -> int:
        """Hand-offs waiting for a decode thread. Each contains one or more jobs."""
        return sum(lane.qsize() for lane in self._lanes)

    def assign_lane(self, spread: bool = True) -> int:
        """Return the lane for a new stream: round robin when ``spread``, else the first lane.

        Spread streams whose decoding releases the GIL (images), and keep the
        others on the first lane.
        """
        if not spread:
            return 0
        return next(self._next_lane) % len(self._lanes)

    def submit(self, lane: int, job: Callable[[], None]) -> None:
        """Queue ``job`` on ``lane`` without blocking; call on the event loop. Jobs of one lane run in order."""
        self._pending[lane].append(job)
        if not self._hand_off_scheduled:
            self._hand_off_scheduled = True
            asyncio.get_running_loop().call_soon(self._hand_off)

    def _hand_off(self) -> None:
        self._hand_off_scheduled = False
        for lane, jobs in zip(self._lanes, self._pending):
            if jobs:
                lane.put(jobs.copy())
                jobs.clear()

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(*args)`` on a decode thread and return its result or raise its error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def job() -> None:
            try:
                result = function(*args)
            except Exception as error:
                loop.call_soon_threadsafe(_settle, future, None, error)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

        self.submit(self.assign_lane(), job)
        return await future

    def _work(self, lane: queue.SimpleQueue[list[Callable[[], None]] | None]) -> None:
        while True:
            jobs = lane.get()
            if jobs is None:
                return
            started = time.perf_counter()
            for job in jobs:
                try:
                    job()
                except Exception:
                    # Jobs report their own errors; reaching here is a bug in one.
                    self.stats.failed_jobs += 1
                    logger.exception("decode job failed")
            self.stats.jobs += len(jobs)
            self.stats.hand_offs += 1
            self.stats.busy_seconds += time.perf_counter() - started


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return  # the caller was cancelled
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
