"""Dynamic batching across streams, and the inference workers that run batches.

One ModelRunner serves one model. Streams submit work items; each of the
model's instances is a worker thread that forms a batch and runs it:

- A batch closes when it contains ``max_batch_size`` items, or when
  ``max_queue_delay`` has passed since its first item arrived, whichever comes
  first. The delay counts from that item's arrival, not from when the worker
  got to it, so a busy worker does not stretch the tail.
- Work is taken in priority order (interactive before bulk), then earliest
  deadline first. An item without a deadline is ordered as if its deadline
  were ``NO_DEADLINE_ORDER_S`` after its arrival.
- For stateful models a batch contains at most one item per stream, and a stream
  whose item is running on one instance waits for it before another instance
  takes its next item. So per-stream state is updated in order.
- An item that can no longer finish by its deadline (its deadline is closer
  than the model's recent batch time at the size of the batch it would join)
  is dropped before inference. A reaper
  thread drops such items on time even while every instance runs a long batch.
- An item its owner cancelled (a video frame superseded by a newer one) is
  dropped when a worker reaches it. Dropped items are handed back with an
  ``ItemDropped`` error, so their owner can report them.
- Items of closed streams are dropped without a report: no one is listening.
- When a batch raises, each item runs again alone, so one poisoned input fails
  only itself.

Finished items go back to the event loop in one callback per batch.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from streaminfer.server import affinity, metrics
from streaminfer.server.config import ModelConfig
from streaminfer.server.models.base import Model, ModelInput, StreamOptions
from streaminfer.server.tracing import ItemTrace
from streaminfer.v1 import streaminfer_pb2 as pb

logger = logging.getLogger(__name__)


class ItemOwner(Protocol):
    """The stream a work item belongs to."""

    closed: bool
    options: StreamOptions


# Ordering horizon for items without a deadline: they run after items whose
# deadlines fall earlier, and before items that arrive this much later.
NO_DEADLINE_ORDER_S = 60.0
# Stale entries the reaper's deadline heap may hold before it is rebuilt.
_DEADLINE_HEAP_SLACK = 1024
PRIORITY_INTERACTIVE = 0
PRIORITY_BULK = 1


class ItemDropped(Exception):
    """A work item removed before inference; ``reason`` is a pb.ChunkErrorReason."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


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
    # Monotonic time after which the result is of no use; inf for none.
    deadline: float = math.inf
    priority: int = PRIORITY_INTERACTIVE
    # Stage times of a sampled chunk (tracing.ChunkTrace); the worker adds its own.
    trace: Any = None
    # Set by the owner (on any thread) to drop the item if it has not started.
    cancelled: bool = False
    cancel_message: str = ""
    enqueued_at: float = 0.0
    # Queue bookkeeping: ordering key, and whether the item is still queued.
    order_key: float = 0.0
    queued: bool = False
    # Filled by the worker.
    queue_wait_s: float = 0.0
    inference_s: float = 0.0
    batch_size: int = 0
    results: list[pb.StreamResult] = dataclasses.field(default_factory=list)
    error: BaseException | None = None


@dataclasses.dataclass(slots=True)
class RunnerStats:
    batches: int = 0
    items: int = 0
    dropped_closed: int = 0
    dropped_deadline: int = 0
    dropped_cancelled: int = 0
    failed_items: int = 0
    # Batches that raised and were run again one item at a time.
    split_batches: int = 0
    closed_full: int = 0
    closed_delay: int = 0
    inference_seconds: float = 0.0
    batch_size_counts: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)

    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class QueueFull(Exception):
    """The model's queue is at its bound."""


class _TakeResult:
    """The result of one take from a queue: the batch and the items left out."""

    __slots__ = ("batch", "dropped", "closed")

    def __init__(self) -> None:
        self.batch: list[WorkItem] = []
        # Items dropped with an ItemDropped error, to hand back.
        self.dropped: list[WorkItem] = []
        # Items of closed streams, forgotten.
        self.closed = 0


@dataclasses.dataclass(frozen=True, slots=True)
class _Cutoff:
    """The deadline before which queued items can no longer finish, and the batch time it allows for."""

    at: float
    batch_s: float


def _screen(item: WorkItem, cutoff: _Cutoff, taken: _TakeResult) -> bool:
    """Return True when ``item`` may run; otherwise record why it may not."""
    if item.owner.closed:
        taken.closed += 1
        return False
    if item.cancelled:
        item.error = ItemDropped(pb.CHUNK_ERROR_REASON_OVERFLOW, item.cancel_message or "cancelled before it ran")
        taken.dropped.append(item)
        return False
    if item.deadline < cutoff.at:
        item.error = _deadline_error(item, cutoff)
        taken.dropped.append(item)
        return False
    return True


def _deadline_error(item: WorkItem, cutoff: _Cutoff) -> ItemDropped:
    left_ms = max(0.0, item.deadline - (cutoff.at - cutoff.batch_s)) * 1000.0
    return ItemDropped(
        pb.CHUNK_ERROR_REASON_DEADLINE,
        f"dropped before inference: its batch would take about {cutoff.batch_s * 1000.0:.0f} ms, and only "
        f"{left_ms:.0f} ms of the stream's chunk latency budget were left (more work is queued than the model "
        "finishes within the budget, or the budget is too short for this model: lower the offered load or raise "
        "StreamConfig.chunk_latency_budget)",
    )


def _moving_average(previous: float | None, value: float) -> float:
    """Return the batch-time average after ``value``: 0.9 of ``previous`` and 0.1 of ``value``, or ``value`` first."""
    return value if previous is None else 0.9 * previous + 0.1 * value


def _size_group(size: int) -> int:
    """Return ``size`` rounded up to a power of two: the group whose batch time prices it."""
    return 1 << (max(1, size) - 1).bit_length()


class _PriorityQueue:
    """Work items of a stateless model: priority, then earliest deadline first."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, WorkItem]] = []
        self._counter = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, item: WorkItem) -> None:
        heapq.heappush(self._heap, (item.priority, item.order_key, next(self._counter), item))
        self._size += 1

    def discard(self, item: WorkItem) -> None:
        # Removed lazily: take() skips items that are no longer queued.
        self._size -= 1

    def _prune(self) -> None:
        while self._heap and not self._heap[0][3].queued:
            heapq.heappop(self._heap)

    def ready_count(self, running: set[int], limit: int) -> int:
        return min(self._size, limit)

    def oldest_arrival(self, running: set[int]) -> float | None:
        self._prune()
        return self._heap[0][3].enqueued_at if self._heap else None

    def take(self, limit: int, running: set[int], cutoff: _Cutoff) -> _TakeResult:
        taken = _TakeResult()
        while self._heap and len(taken.batch) < limit:
            item = heapq.heappop(self._heap)[3]
            if not item.queued:
                continue
            item.queued = False
            self._size -= 1
            if _screen(item, cutoff, taken):
                taken.batch.append(item)
        return taken


class _PerStreamQueue:
    """Work items of a stateful model: one FIFO per stream.

    A batch takes the head item of up to ``limit`` streams whose previous
    item is not running, choosing heads by priority, then earliest deadline.
    """

    def __init__(self) -> None:
        self._lanes: dict[int, collections.deque[WorkItem]] = {}
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

    def discard(self, item: WorkItem) -> None:
        self._size -= 1
        key = id(item.owner)
        lane = self._lanes.get(key)
        if lane is None:
            return
        while lane and not lane[0].queued:
            lane.popleft()
        if not lane:
            del self._lanes[key]

    def ready_count(self, running: set[int], limit: int) -> int:
        count = 0
        for key in self._lanes:
            if key not in running:
                count += 1
                if count >= limit:
                    break
        return count

    def oldest_arrival(self, running: set[int]) -> float | None:
        oldest = None
        for key, lane in self._lanes.items():
            if key not in running and (oldest is None or lane[0].enqueued_at < oldest):
                oldest = lane[0].enqueued_at
        return oldest

    def take(self, limit: int, running: set[int], cutoff: _Cutoff) -> _TakeResult:
        taken = _TakeResult()
        heads = [
            (lane[0].priority, lane[0].order_key, key) for key, lane in self._lanes.items() if key not in running
        ]
        chosen = heads if len(heads) <= limit else heapq.nsmallest(limit, heads)
        for _, _, key in chosen:
            lane = self._lanes[key]
            while lane:
                item = lane.popleft()
                if not item.queued:
                    continue
                item.queued = False
                self._size -= 1
                if item.owner.closed:
                    # The whole lane belongs to the closed stream.
                    remaining = sum(1 for rest in lane if rest.queued)
                    taken.closed += 1 + remaining
                    self._size -= remaining
                    for rest in lane:
                        rest.queued = False
                    lane.clear()
                    break
                if _screen(item, cutoff, taken):
                    taken.batch.append(item)
                    break
            if not lane:
                del self._lanes[key]
        return taken


class ModelRunner:
    """Queue, batcher, reaper and inference workers of one model."""

    def __init__(
        self,
        model: Model,
        config: ModelConfig,
        device: str,
        deliver: Callable[[list[WorkItem]], None],
        loop: asyncio.AbstractEventLoop,
        torch_threads: int = 1,
        clock: Callable[[], float] = time.monotonic,
        cpus: frozenset[int] | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.stats = RunnerStats()
        self._deliver = deliver
        self._loop = loop
        self._torch_threads = torch_threads
        # CPUs the inference threads run on; None leaves them where the process runs.
        self._cpus = cpus
        self._clock = clock
        self._max_batch = config.batching.max_batch_size
        self._max_delay = config.batching.max_queue_delay_ms / 1000.0
        self._max_queue = config.batching.max_queue_size
        self._stateful = model.info.stateful
        self._queue: _PriorityQueue | _PerStreamQueue = _PerStreamQueue() if self._stateful else _PriorityQueue()
        lock = threading.Lock()
        # Workers wait on _cond for items; submitters wait on _space for room;
        # the reaper waits on _reap for the next deadline.
        self._cond = threading.Condition(lock)
        self._space = threading.Condition(lock)
        self._reap = threading.Condition(lock)
        # Items with a deadline, earliest first, for the reaper (removed lazily).
        self._deadlines: list[tuple[float, int, WorkItem]] = []
        self._counter = itertools.count()
        self._owners_running: set[int] = set()
        self._stopping = False
        # Per instance: when its running batch started, or None when idle.
        self._running_since: list[float | None] = [None] * config.instances
        # Moving average of one batch's inference seconds: the time an item
        # still needs once it is taken. The same by batch size, rounded up
        # to a power of two, prices the batch a queued item would join.
        self.batch_seconds = 0.0
        self._batch_seconds_by_size: dict[int, float] = {}
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"infer-{config.name}-{i}", daemon=True)
            for i in range(config.instances)
        ]
        self._reaper = threading.Thread(target=self._reap_expired, name=f"reap-{config.name}", daemon=True)
        name = config.name
        self._metric_full = metrics.BATCHES.labels(name, "full")
        self._metric_delay = metrics.BATCHES.labels(name, "delay")
        self._metric_size = metrics.BATCH_SIZE.labels(name)
        self._metric_fill = metrics.BATCH_FILL.labels(name)
        self._metric_queue_wait = metrics.QUEUE_WAIT.labels(name)
        self._metric_inference = metrics.INFERENCE.labels(name)
        self._metric_postprocess = metrics.POSTPROCESS.labels(name)
        self._metric_failed = metrics.ITEMS_FAILED.labels(name)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        self._reaper.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            self._reap.notify_all()
        for thread in [*self._threads, self._reaper]:
            thread.join(timeout=30)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def busy_instances(self) -> int:
        return sum(1 for since in self._running_since if since is not None)

    def longest_running_s(self) -> float:
        """Seconds the longest-running batch has run so far; 0 when idle."""
        now = self._clock()
        started = [since for since in self._running_since if since is not None]
        return now - min(started) if started else 0.0

    def oldest_queued_age_s(self) -> float:
        """Seconds the oldest queued item has waited; 0 when the queue is empty."""
        with self._cond:
            oldest = self._queue.oldest_arrival(set())
        return self._clock() - oldest if oldest is not None else 0.0

    def projected_wait_s(self) -> float:
        """Seconds a new item would wait before its batch starts, from the queue depth and batch time."""
        batches_ahead = math.ceil(len(self._queue) / self._max_batch)
        return batches_ahead * self.batch_seconds / len(self._running_since)

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
            earliest = self._deadlines[0][0] if self._deadlines else math.inf
            for item in items:
                item.enqueued_at = now
                item.queued = True
                finite = item.deadline != math.inf
                item.order_key = item.deadline if finite else now + NO_DEADLINE_ORDER_S
                self._queue.append(item)
                if finite:
                    heapq.heappush(self._deadlines, (item.deadline, next(self._counter), item))
            if len(self._deadlines) > 2 * len(self._queue) + _DEADLINE_HEAP_SLACK:
                # Entries of items that already ran leave the heap only when
                # they reach its top; drop them now so they free their inputs.
                self._deadlines = [entry for entry in self._deadlines if entry[2].queued]
                heapq.heapify(self._deadlines)
            # Wake a worker only when it has something new to decide: the
            # first item starts a delay window, a full batch ends it.
            if was_empty or (was_below and len(self._queue) >= self._max_batch):
                self._cond.notify()
            if self._deadlines and self._deadlines[0][0] < earliest:
                self._reap.notify()

    def batch_seconds_for(self, size: int) -> float:
        """Return the inference seconds expected for a batch of ``size`` items; 0 before any batch ran.

        Sizes are grouped by powers of two. A group that has not run yet is
        priced from the nearest group that has. A larger group gets that
        group's time, and a smaller one a share in proportion to its size.
        Both err low, so no item is dropped for a time its batch size has
        not shown.
        """
        known = self._batch_seconds_by_size
        if not known:
            return 0.0
        group = _size_group(size)
        if group in known:
            return known[group]
        # Worker threads add groups without the lock: iterate over a copy of the keys.
        nearest = min(tuple(known), key=lambda seen: abs(math.log2(seen / group)))
        return known[nearest] * min(1.0, group / nearest)

    def _cutoff(self) -> _Cutoff:
        """Return the deadline before which queued items can no longer finish: now plus the time of their batch."""
        batch_s = self.batch_seconds_for(min(max(1, len(self._queue)), self._max_batch))
        return _Cutoff(self._clock() + batch_s, batch_s)

    def _take_batch(self) -> tuple[list[WorkItem], list[WorkItem]] | None:
        """Wait for and remove the next batch; also return the items dropped on the way. None when stopping."""
        with self._cond:
            dropped: list[WorkItem] = []
            while True:
                oldest = self._queue.oldest_arrival(self._owners_running)
                while oldest is None and not self._stopping:
                    if dropped:
                        return [], dropped
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

                taken = self._queue.take(self._max_batch, self._owners_running, self._cutoff())
                self._count_dropped(taken.dropped, taken.closed)
                dropped.extend(taken.dropped)
                if taken.closed or taken.dropped or taken.batch:
                    self._space.notify_all()
                batch = taken.batch
                if batch:
                    if self._stateful:
                        self._owners_running.update(id(item.owner) for item in batch)
                    if len(batch) >= self._max_batch:
                        self.stats.closed_full += 1
                        self._metric_full.inc()
                    else:
                        self.stats.closed_delay += 1
                        self._metric_delay.inc()
                    return batch, dropped

    def _count_dropped(self, dropped: list[WorkItem], closed: int) -> None:
        self.stats.dropped_closed += closed
        for item in dropped:
            if isinstance(item.error, ItemDropped) and item.error.reason == pb.CHUNK_ERROR_REASON_DEADLINE:
                self.stats.dropped_deadline += 1
            else:
                self.stats.dropped_cancelled += 1

    def _reap_expired(self) -> None:
        """Drop queued items at the moment they can no longer meet their deadline."""
        while True:
            with self._cond:
                expired: list[WorkItem] = []
                while not self._stopping:
                    while self._deadlines and not self._deadlines[0][2].queued:
                        heapq.heappop(self._deadlines)
                    if not self._deadlines:
                        self._reap.wait()
                        continue
                    wait = self._deadlines[0][0] - self._cutoff().at
                    if wait > 0:
                        self._reap.wait(wait)
                        continue
                    cutoff = self._cutoff()
                    while self._deadlines and self._deadlines[0][0] < cutoff.at:
                        item = heapq.heappop(self._deadlines)[2]
                        if not item.queued:
                            continue
                        item.queued = False
                        self._queue.discard(item)
                        if item.owner.closed:
                            self.stats.dropped_closed += 1
                            continue
                        item.error = _deadline_error(item, cutoff)
                        expired.append(item)
                    break
                if self._stopping:
                    return
                self.stats.dropped_deadline += len(expired)
                self._space.notify_all()
            if expired:
                self._loop.call_soon_threadsafe(self._deliver, expired)

    def _work(self, instance: int) -> None:
        if self._cpus is not None:
            # Before torch starts its intra-op threads, which inherit it.
            try:
                affinity.pin_current_thread(self._cpus)
            except OSError as error:
                logger.error(
                    "model %s: pinning inference thread %d to CPU(s) %s failed (%s); it runs on the CPUs of the rest of the process",
                    self.model.info.name,
                    instance,
                    affinity.format_cpus(self._cpus),
                    error,
                )
        torch.set_num_threads(self._torch_threads)
        while True:
            taken = self._take_batch()
            if taken is None:
                return
            batch, dropped = taken
            if dropped:
                self._loop.call_soon_threadsafe(self._deliver, dropped)
            if not batch:
                continue
            self._running_since[instance] = self._clock()
            try:
                self._run(batch)
            finally:
                self._running_since[instance] = None
                if self._stateful:
                    with self._cond:
                        self._owners_running.difference_update(id(item.owner) for item in batch)
                        self._cond.notify_all()
            self._loop.call_soon_threadsafe(self._deliver, batch)

    def _forward(self, items: list[WorkItem]) -> list[Any]:
        with torch.inference_mode():
            outputs = self.model.run_batch([item.model_input for item in items], [item.inference_state for item in items])
        if len(outputs) != len(items):
            raise RuntimeError(f"run_batch returned {len(outputs)} outputs for {len(items)} inputs")
        return outputs

    def _run(self, batch: list[WorkItem]) -> None:
        # 1. Items that only complete chunks need no inference.
        started = self._clock()
        runnable = [item for item in batch if item.model_input.data is not None]
        for item in batch:
            item.queue_wait_s = started - item.enqueued_at
            item.batch_size = len(runnable)

        # 2. One forward pass for the whole batch. When it raises, each item
        # runs alone, so a poisoned input fails itself and no other.
        outputs: list[Any] = []
        if runnable:
            try:
                outputs = self._forward(runnable)
            except Exception as error:
                if len(runnable) == 1:
                    logger.exception("model %s failed on an item of stream %s", self.config.name, runnable[0].owner.options.stream_id)
                    outputs = [error]
                else:
                    logger.warning(
                        "model %s failed on a batch of %d items (%s: %s); running them one at a time",
                        self.config.name,
                        len(runnable),
                        type(error).__name__,
                        error,
                    )
                    self.stats.split_batches += 1
                    outputs = [self._run_alone(item) for item in runnable]
        inference_s = self._clock() - started
        self.stats.batches += 1
        self.stats.items += len(runnable)
        self.stats.inference_seconds += inference_s
        self.stats.batch_size_counts[len(runnable)] += 1
        if runnable:
            self.batch_seconds = _moving_average(self.batch_seconds if self.stats.batches > 1 else None, inference_s)
            group = _size_group(len(runnable))
            self._batch_seconds_by_size[group] = _moving_average(self._batch_seconds_by_size.get(group), inference_s)
            self._metric_size.observe(len(runnable))
            self._metric_fill.observe(len(runnable) / self._max_batch)
            self._metric_inference.observe(inference_s)
        for item in batch:
            self._metric_queue_wait.observe(item.queue_wait_s)

        # 3. Postprocess each item on its own, so one bad output fails one item.
        failed = 0
        post_started = self._clock()
        for item, output in zip(runnable, outputs):
            item.inference_s = inference_s
            if isinstance(output, BaseException):
                item.error = output
                failed += 1
                continue
            try:
                item.results = self.model.postprocess(item.inference_state, item.model_input, output, item.owner.options)
            except Exception as error:
                logger.exception("model %s failed to postprocess an item of stream %s", self.config.name, item.owner.options.stream_id)
                item.error = error
                failed += 1
        if runnable:
            finished = self._clock()
            self._metric_postprocess.observe(finished - post_started)
            for item in runnable:
                if item.trace is not None:
                    item.trace.items.append(
                        ItemTrace(self.config.name, len(runnable), item.enqueued_at, started, started + inference_s, finished)
                    )
        if failed:
            self.stats.failed_items += failed
            self._metric_failed.inc(failed)

    def _run_alone(self, item: WorkItem) -> Any:
        try:
            return self._forward([item])[0]
        except Exception as error:
            logger.exception("model %s failed on an item of stream %s", self.config.name, item.owner.options.stream_id)
            return error
