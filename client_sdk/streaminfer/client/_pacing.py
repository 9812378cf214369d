"""Pacing: release timestamped chunks at real-time pace, faster, or at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator

from streaminfer.client._media import MediaChunk

__all__ = ["Pacer", "paced", "paced_async"]


class Pacer:
    """Computes how long to wait before a chunk is due.

    The schedule is anchored at the first chunk: a chunk with media time ``t``
    is due ``t / speed`` seconds after the first one was released. Delays of
    the sender (a full window, a slow write) do not shift later chunks; the
    sender catches up instead. ``speed`` 0 makes every chunk due at once.
    """

    def __init__(self, speed: float = 1.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not speed >= 0:
            raise ValueError(f"speed = {speed!r} is invalid: expected 0 (as fast as possible) or a factor > 0")
        self.speed = speed
        self._clock = clock
        self._start_wall: float | None = None
        self._start_media: float = 0.0

    def delay_s(self, timestamp_s: float) -> float:
        """Return the seconds until the chunk at media time ``timestamp_s`` is due."""
        if self.speed == 0:
            return 0.0
        now = self._clock()
        if self._start_wall is None:
            self._start_wall = now
            self._start_media = timestamp_s
        due = self._start_wall + (timestamp_s - self._start_media) / self.speed
        return max(0.0, due - now)


def paced(chunks: Iterable[MediaChunk], speed: float = 1.0) -> Iterator[MediaChunk]:
    """Yield ``chunks`` when due, blocking the calling thread in between."""
    pacer = Pacer(speed)
    for chunk in chunks:
        delay = pacer.delay_s(chunk.timestamp_s)
        if delay > 0:
            time.sleep(delay)
        yield chunk


async def paced_async(
    chunks: Iterable[MediaChunk], speed: float = 1.0, *, read_in_thread: bool = False
) -> AsyncIterator[MediaChunk]:
    """Yield ``chunks`` when due, sleeping on the event loop in between.

    With ``read_in_thread`` each chunk is read in a worker thread, so a reader
    that decodes video does not hold the event loop while responses wait.
    """
    pacer = Pacer(speed)
    iterator = iter(chunks)
    while True:
        if read_in_thread:
            chunk = await asyncio.to_thread(next, iterator, None)
        else:
            chunk = next(iterator, None)
        if chunk is None:
            return
        delay = pacer.delay_s(chunk.timestamp_s)
        if delay > 0:
            await asyncio.sleep(delay)
        yield chunk
