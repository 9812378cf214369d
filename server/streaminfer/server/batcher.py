"""Dynamic batching across streams, and the inference workers that run batches.

One ModelRunner serves one model. Streams submit work items from the event
loop; each of the model's instances is a worker thread that forms a batch and
runs it:

- A batch closes when it contains ``max_batch_size`` items, or when
  ``max_queue_delay`` has passed since its first item arrived, whichever comes
  first. The delay counts from that item's arrival, not from when the worker
  got to it, so a busy worker does not stretch the tail.
- For stateful models a batch contains at most one item per stream, and a stream
  whose item is running on one instance waits for it before another instance
  takes its next item. So per-stream state is updated in order.
- Items of closed streams are dropped before the batch runs.

Finished items go back to the event loop in one callback per batch.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from streaminfer.server.config import ModelConfig
from streaminfer.server.models.base import Model, ModelInput, StreamOptions
from streaminfer.v1 import streaminfer_pb2 as pb

logger = logging.getLogger(__name__)


class ItemOwner(Protocol):
    """The stream a work item belongs to."""

    closed: bool
    options: StreamOptions


@dataclasses.dataclass(slots=True, eq=False)
class WorkItem:
    owner: ItemOwner
    # The owner's bookkeeping for this model, handed back with the item.
    slot: Any
    model_input: ModelInput
    # Position among this stream's items for this model; the owner releases
    # results in this order whatever order the instances finish in.
    index: int
    inference_state: Any
    preprocess_state: Any
    enqueued_at: float = 0.0
    # Filled by the worker.
    queue_wait_s: float = 0.0
    inference_s: float = 0.0
    postprocess_s: float = 0.0
    batch_size: int = 0
    results: list[pb.StreamResult] = dataclasses.field(default_factory=list)
    error: BaseException | None = None


@dataclasses.dataclass(slots=True)
class RunnerStats:
    batches: int = 0
    items: int = 0
    dropped_closed: int = 0
    closed_full: int = 0
    closed_delay: int = 0
    inference_seconds: float = 0.0
    batch_size_counts: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)

    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class QueueFull(Exception):
    """The model's queue is at its bound."""


class _FifoQueue:
    """Work items of a stateless model, oldest first."""

    def __init__(self) -> None:
        self._items: collections.deque[WorkItem] = collections.deque()

    def __len__(self) -> int:
        return len(self._items)

    def append(self, item: WorkItem) -> None:
        self._items.append(item)

    def ready_count(self, running: set[int], limit: int) -> int:
        return min(len(self._items), limit)

    def oldest_arrival(self, running: set[int]) -> float | None:
        return self._items[0].enqueued_at if self._items else None

    def take(self, limit: int, running: set[int]) -> tuple[list[WorkItem], int]:
        batch: list[WorkItem] = []
        dropped = 0
        while self._items and len(batch) < limit:
            item = self._items.popleft()
            if item.owner.closed:
                dropped += 1
            else:
                batch.append(item)
        return batch, dropped


class _PerStreamQueue:
    """Work items of a stateful model: one FIFO per stream, streams in turn.

    A batch takes the head item of up to ``limit`` streams, skipping streams
    whose previous item still runs, in O(batch) time however many items are
    queued. A served stream goes to the back, so streams take turns.
    """

    def __init__(self) -> None:
        self._lanes: collections.OrderedDict[int, collections.deque[WorkItem]] = collections.OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, item: WorkItem) -> None:
        key = id(item.owner)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = collections.deque()
        lane.append(item)
        self._size += 1

    def ready_count(self, running: set[int], limit: int) -> int:
        count = 0
        for key in self._lanes:
            if key not in running:
                count += 1
                if count >= limit:
                    break
        return count

    def oldest_arrival(self, running: set[int]) -> float | None:
        for key, lane in self._lanes.items():
            if key not in running:
                return lane[0].enqueued_at
        return None

    def take(self, limit: int, running: set[int]) -> tuple[list[WorkItem], int]:
        batch: list[WorkItem] = []
        dropped = 0
        for key in list(self._lanes):
            if len(batch) >= limit:
                break
            if key in running:
                continue
            lane = self._lanes[key]
            if lane[0].owner.closed:
                dropped += len(lane)
                self._size -= len(lane)
                del self._lanes[key]
                continue
            batch.append(lane.popleft())
            self._size -= 1
            if lane:
                self._lanes.move_to_end(key)
            else:
                del self._lanes[key]
        return batch, dropped


class ModelRunner:
    """Queue, batcher and inference workers of one model."""

    def __init__(
        self,
        model: Model,
        config: ModelConfig,
        device: str,
        deliver: Callable[[list[WorkItem]], None],
        loop: asyncio.AbstractEventLoop,
        torch_threads: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.stats = RunnerStats()
        self._deliver = deliver
        self._loop = loop
        self._torch_threads = torch_threads
        self._clock = clock
        self._max_batch = config.batching.max_batch_size
        self._max_delay = config.batching.max_queue_delay_ms / 1000.0
        self._max_queue = config.batching.max_queue_size
        self._stateful = model.info.stateful
        self._queue: _FifoQueue | _PerStreamQueue = _PerStreamQueue() if self._stateful else _FifoQueue()
        lock = threading.Lock()
        # Workers wait on _cond for items; submitters wait on _space for room.
        self._cond = threading.Condition(lock)
        self._space = threading.Condition(lock)
        self._owners_running: set[int] = set()
        self._stopping = False
        self._busy = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"infer-{config.name}-{i}", daemon=True)
            for i in range(config.instances)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def busy_instances(self) -> int:
        return self._busy

    def submit(self, items: Sequence[WorkItem], timeout: float | None = None) -> None:
        """Queue items, waiting up to ``timeout`` seconds for room.

        Raises QueueFull when the bound would still be passed then. With no
        timeout it never waits for room (only for the queue's lock, held for
        microseconds), so the event loop may call it.
        """
        with self._cond:
            if len(items) > self._max_queue:
                raise QueueFull(
                    f"model {self.config.name!r}: {len(items)} items at once exceed the queue limit of {self._max_queue}"
                )
            if len(self._queue) + len(items) > self._max_queue and timeout:
                self._space.wait_for(lambda: len(self._queue) + len(items) <= self._max_queue, timeout)
            if len(self._queue) + len(items) > self._max_queue:
                raise QueueFull(
                    f"model {self.config.name!r} has {len(self._queue)} items queued, the limit is {self._max_queue}"
                )

            now = self._clock()
            was_empty = len(self._queue) == 0
            was_below = len(self._queue) < self._max_batch
            for item in items:
                item.enqueued_at = now
                self._queue.append(item)
            # Wake a worker only when it has something new to decide: the
            # first item starts a delay window, a full batch ends it.
            if was_empty or (was_below and len(self._queue) >= self._max_batch):
                self._cond.notify()

    def _take_batch(self) -> list[WorkItem] | None:
        """Wait for and remove the next batch. Returns None when stopping."""
        with self._cond:
            while True:
                oldest = self._queue.oldest_arrival(self._owners_running)
                while oldest is None and not self._stopping:
                    self._cond.wait()
                    oldest = self._queue.oldest_arrival(self._owners_running)
                if self._stopping:
                    return None

                close_at = oldest + self._max_delay
                while not self._stopping:
                    if self._queue.ready_count(self._owners_running, self._max_batch) >= self._max_batch:
                        break
                    remaining = close_at - self._clock()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._stopping:
                    return None

                batch, dropped = self._queue.take(self._max_batch, self._owners_running)
                self.stats.dropped_closed += dropped
                if dropped or batch:
                    self._space.notify_all()
                if batch:
                    if self._stateful:
                        self._owners_running.update(id(item.owner) for item in batch)
                    if len(batch) >= self._max_batch:
                        self.stats.closed_full += 1
                    else:
                        self.stats.closed_delay += 1
                    return batch

    def _work(self) -> None:
        torch.set_num_threads(self._torch_threads)
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._busy += 1
            try:
                self._run(batch)
            finally:
                self._busy -= 1
                if self._stateful:
                    with self._cond:
                        self._owners_running.difference_update(id(item.owner) for item in batch)
                        self._cond.notify_all()
            self._loop.call_soon_threadsafe(self._deliver, batch)

    def _run(self, batch: list[WorkItem]) -> None:
        # 1. Items that only complete chunks need no inference.
        started = self._clock()
        runnable = [item for item in batch if item.model_input.data is not None]
        for item in batch:
            item.queue_wait_s = started - item.enqueued_at
            item.batch_size = len(runnable)

        # 2. One forward pass for the whole batch.
        outputs: list[Any] = []
        if runnable:
            try:
                with torch.inference_mode():
                    outputs = self.model.run_batch(
                        [item.model_input for item in runnable], [item.inference_state for item in runnable]
                    )
                if len(outputs) != len(runnable):
                    raise RuntimeError(f"run_batch returned {len(outputs)} outputs for {len(runnable)} inputs")
            except Exception as error:
                logger.exception("model %s failed on a batch of %d items", self.config.name, len(runnable))
                outputs = [error] * len(runnable)
        inference_s = self._clock() - started
        self.stats.batches += 1
        self.stats.items += len(runnable)
        self.stats.inference_seconds += inference_s
        self.stats.batch_size_counts[len(runnable)] += 1

        # 3. Postprocess each item on its own, so one bad output fails one item.
        for item, output in zip(runnable, outputs):
            item.inference_s = inference_s
            if isinstance(output, BaseException):
                item.error = output
                continue
            post_started = self._clock()
            try:
                item.results = self.model.postprocess(item.inference_state, item.model_input, output, item.owner.options)
            except Exception as error:
                logger.exception("model %s failed to postprocess an item of stream %s", self.config.name, item.owner.options.stream_id)
                item.error = error
            item.postprocess_s = self._clock() - post_started
