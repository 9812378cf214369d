"""The dynamic batcher: batch limits, delay from first arrival, per-stream order, bounds."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from streaminfer.server.batcher import PRIORITY_BULK, ItemDropped, ModelRunner, QueueFull, WorkItem
from streaminfer.server.config import BatchingConfig, ModelConfig
from streaminfer.server.models.base import DecodedChunk, Model, ModelInfo, ModelInput, StreamOptions
from streaminfer.v1 import streaminfer_pb2 as pb


class RecordingModel(Model):
    """Records each batch; stateful when asked. Its outputs are its inputs."""

    def __init__(self, stateful: bool, delay_s: float = 0.0) -> None:
        self.info = ModelInfo(name="recording", modality=pb.MODALITY_AUDIO, description="", stateful=stateful)
        self.batches: list[list[Any]] = []
        self.delay_s = delay_s

    def load(self, device: str) -> None:
        pass

    def preprocess(self, state: Any, chunk: DecodedChunk) -> list[ModelInput]:
        raise NotImplementedError

    def run_batch(self, inputs: Sequence[ModelInput], states: Sequence[Any]) -> list[Any]:
        self.batches.append([item.data for item in inputs])
        if any(item.data == "poison" for item in inputs):
            raise ValueError("poisoned input")
        time.sleep(self.delay_s)
        return [item.data for item in inputs]

    def postprocess(self, state: Any, item: ModelInput, output: Any, options: StreamOptions) -> list[pb.StreamResult]:
        return []


@dataclasses.dataclass(eq=False)
class Owner:
    options: StreamOptions
    closed: bool = False


class Harness:
    """A runner on a private event loop thread, collecting delivered items."""

    def __init__(self, model: Model, batching: BatchingConfig, instances: int = 1) -> None:
        self.loop = asyncio.new_event_loop()
        self.delivered: list[WorkItem] = []
        self.done = threading.Event()
        self.expected = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        config = ModelConfig(name="recording", kind="noop", batching=batching, instances=instances)
        self.runner = ModelRunner(model, config, "cpu", self._deliver, self.loop)
        self.runner.start()

    def _deliver(self, items: list[WorkItem]) -> None:
        self.delivered.extend(items)
        if len(self.delivered) >= self.expected:
            self.done.set()

    def item(self, owner: Owner, data: Any, deadline: float = float("inf"), priority: int = 0) -> WorkItem:
        return WorkItem(
            owner=owner,
            slot=None,
            model_input=ModelInput(data, 0, 0, 0),
            index=0,
            inference_state=None,
            preprocess_state=None,
            deadline=deadline,
            priority=priority,
        )

    def outcome(self, data: Any) -> str:
        """Return "ran", or the reason an item was dropped or failed."""
        item = next(item for item in self.delivered if item.model_input.data == data)
        if isinstance(item.error, ItemDropped):
            return pb.ChunkErrorReason.Name(item.error.reason)
        if item.error is not None:
            return f"failed: {item.error}"
        return "ran"

    def close(self) -> None:
        self.runner.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def owner(name: str) -> Owner:
    return Owner(StreamOptions(stream_id=name, interim_results=False))


def test_full_batch_closes_before_delay() -> None:
    model = RecordingModel(stateful=False)
    harness = Harness(model, BatchingConfig(max_batch_size=4, max_queue_delay_ms=5_000))
    harness.expected = 8
    stream = owner("a")
    started = time.monotonic()
    harness.runner.submit([harness.item(stream, i) for i in range(8)])
    assert harness.done.wait(timeout=10)
    elapsed = time.monotonic() - started
    harness.close()
    assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert elapsed < 2.5, "full batches waited for the 5 s queue delay"
    assert harness.runner.stats.closed_full == 2


def test_partial_batch_closes_at_delay() -> None:
    model = RecordingModel(stateful=False)
    harness = Harness(model, BatchingConfig(max_batch_size=64, max_queue_delay_ms=200))
    harness.expected = 3
    stream = owner("a")
    harness.runner.submit([harness.item(stream, 0)])
    time.sleep(0.1)
    harness.runner.submit([harness.item(stream, 1), harness.item(stream, 2)])
    assert harness.done.wait(timeout=10)
    harness.close()
    # Items that came within the window from the first arrival share its batch.
    assert model.batches == [[0, 1, 2]]
    assert harness.runner.stats.closed_delay == 1


def test_stateful_batch_takes_one_item_per_stream() -> None:
    model = RecordingModel(stateful=True)
    harness = Harness(model, BatchingConfig(max_batch_size=8, max_queue_delay_ms=20), instances=2)
    streams = [owner(name) for name in "abc"]
    harness.expected = 12
    for stream in streams:
        harness.runner.submit([harness.item(stream, (stream.options.stream_id, i)) for i in range(4)])
    assert harness.done.wait(timeout=10)
    harness.close()

    for batch in model.batches:
        names = [name for name, _ in batch]
        assert len(names) == len(set(names)), f"a batch held two items of one stream: {batch}"
    for stream in streams:
        order = [i for batch in model.batches for name, i in batch if name == stream.options.stream_id]
        assert order == [0, 1, 2, 3]


def test_closed_stream_items_are_dropped() -> None:
    model = RecordingModel(stateful=False, delay_s=0.2)
    harness = Harness(model, BatchingConfig(max_batch_size=1, max_queue_delay_ms=0))
    alive, closing = owner("alive"), owner("closing")
    harness.expected = 2
    harness.runner.submit([harness.item(alive, "first")])
    time.sleep(0.05)
    harness.runner.submit([harness.item(closing, "dropped"), harness.item(alive, "second")])
    closing.closed = True
    assert harness.done.wait(timeout=10)
    harness.close()
    assert model.batches == [["first"], ["second"]]
    assert harness.runner.stats.dropped_closed == 1


def test_full_queue_fails_fast_without_timeout() -> None:
    model = RecordingModel(stateful=False, delay_s=0.5)
    harness = Harness(model, BatchingConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2))
    stream = owner("a")
    harness.runner.submit([harness.item(stream, 0)])
    time.sleep(0.05)  # item 0 is running; the queue is empty again
    harness.runner.submit([harness.item(stream, 1), harness.item(stream, 2)])
    started = time.monotonic()
    with pytest.raises(QueueFull) as error:
        harness.runner.submit([harness.item(stream, 3)])
    assert time.monotonic() - started < 0.1
    assert "the limit is 2" in str(error.value)

    # With a timeout the same submission waits for room instead.
    harness.expected = 4
    harness.runner.submit([harness.item(stream, 3)], timeout=5)
    assert harness.done.wait(timeout=10)
    harness.close()
    assert [batch[0] for batch in model.batches] == [0, 1, 2, 3]


def test_queued_item_expires_during_slow_batch() -> None:
    model = RecordingModel(stateful=False, delay_s=1.5)
    harness = Harness(model, BatchingConfig(max_batch_size=1, max_queue_delay_ms=0))
    stream = owner("a")
    harness.expected = 2
    harness.runner.submit([harness.item(stream, "slow")])
    time.sleep(0.1)  # "slow" is running
    harness.runner.submit([harness.item(stream, "late", deadline=time.monotonic() + 0.2)])
    assert harness.done.wait(timeout=10)
    harness.close()

    # The reaper dropped "late" at its deadline, before the running batch ended.
    assert [item.model_input.data for item in harness.delivered] == ["late", "slow"]
    assert harness.outcome("late") == "CHUNK_ERROR_REASON_DEADLINE"
    assert harness.outcome("slow") == "ran"
    assert model.batches == [["slow"]]
    assert harness.runner.stats.dropped_deadline == 1


class PerItemModel(RecordingModel):
    """Takes ``seconds_per_item`` for each item of a batch."""

    def __init__(self, seconds_per_item: float) -> None:
        super().__init__(stateful=False)
        self.seconds_per_item = seconds_per_item

    def run_batch(self, inputs: Sequence[ModelInput], states: Sequence[Any]) -> list[Any]:
        self.batches.append([item.data for item in inputs])
        time.sleep(self.seconds_per_item * len(inputs))
        return [item.data for item in inputs]


def test_single_item_priced_below_large_batches() -> None:
    model = PerItemModel(seconds_per_item=0.05)
    harness = Harness(model, BatchingConfig(max_batch_size=8, max_queue_delay_ms=50))
    stream = owner("a")
    harness.expected = 8
    harness.runner.submit([harness.item(stream, i) for i in range(8)])
    assert harness.done.wait(timeout=10)
    eight = harness.runner.batch_seconds_for(8)
    # A batch of 8 took at least 0.4 s. A lone item is priced at an eighth of
    # that, so with 0.25 s of budget left it runs instead of being dropped.
    harness.done.clear()
    harness.expected = 9
    harness.runner.submit([harness.item(stream, "alone", deadline=time.monotonic() + 0.25)])
    assert harness.done.wait(timeout=10)
    harness.close()

    assert eight >= 0.4
    # Sizes not run yet are priced low: a larger batch at the nearest size's time.
    assert harness.runner.batch_seconds_for(16) == pytest.approx(eight)
    assert harness.outcome("alone") == "ran"
    assert model.batches[-1] == ["alone"]


def test_deadline_drop_names_time_left() -> None:
    model = PerItemModel(seconds_per_item=0.3)
    harness = Harness(model, BatchingConfig(max_batch_size=1, max_queue_delay_ms=0))
    stream = owner("a")
    harness.expected = 1
    harness.runner.submit([harness.item(stream, "first")])
    assert harness.done.wait(timeout=10)
    # Batches take 0.3 s or more; 0.1 s of budget cannot cover one.
    harness.done.clear()
    harness.expected = 2
    harness.runner.submit([harness.item(stream, "late", deadline=time.monotonic() + 0.1)])
    assert harness.done.wait(timeout=10)
    harness.close()

    assert harness.outcome("late") == "CHUNK_ERROR_REASON_DEADLINE"
    message = str(harness.delivered[-1].error)
    assert message.startswith("dropped before inference: its batch would take about ")
    assert "ms of the stream's chunk latency budget were left" in message
    assert model.batches == [["first"]]


def test_earliest_deadline_runs_first() -> None:
    model = RecordingModel(stateful=False, delay_s=0.3)
    harness = Harness(model, BatchingConfig(max_batch_size=2, max_queue_delay_ms=0))
    stream = owner("a")
    harness.expected = 5
    harness.runner.submit([harness.item(stream, "blocker")])
    time.sleep(0.1)
    now = time.monotonic()
    harness.runner.submit(
        [
            harness.item(stream, "no deadline"),
            harness.item(stream, "in 30 s", deadline=now + 30),
            harness.item(stream, "in 20 s", deadline=now + 20),
            harness.item(stream, "in 10 s", deadline=now + 10),
        ]
    )
    assert harness.done.wait(timeout=10)
    harness.close()
    assert model.batches == [["blocker"], ["in 10 s", "in 20 s"], ["in 30 s", "no deadline"]]


def test_interactive_runs_before_bulk() -> None:
    model = RecordingModel(stateful=True, delay_s=0.3)
    harness = Harness(model, BatchingConfig(max_batch_size=2, max_queue_delay_ms=0))
    streams = {name: owner(name) for name in ("blocker", "bulk-1", "bulk-2", "live-1", "live-2")}
    harness.expected = 5
    harness.runner.submit([harness.item(streams["blocker"], "blocker")])
    time.sleep(0.1)
    now = time.monotonic()
    # The bulk items have the earlier deadlines, and still wait.
    for name in ("bulk-1", "bulk-2"):
        harness.runner.submit([harness.item(streams[name], name, deadline=now + 5, priority=PRIORITY_BULK)])
    for offset, name in enumerate(("live-1", "live-2")):
        harness.runner.submit([harness.item(streams[name], name, deadline=now + 10 + offset)])
    assert harness.done.wait(timeout=10)
    harness.close()
    assert model.batches == [["blocker"], ["live-1", "live-2"], ["bulk-1", "bulk-2"]]


def test_poisoned_input_fails_alone() -> None:
    model = RecordingModel(stateful=False)
    harness = Harness(model, BatchingConfig(max_batch_size=4, max_queue_delay_ms=50))
    stream = owner("a")
    harness.expected = 4
    harness.runner.submit([harness.item(stream, data) for data in ("a", "poison", "b", "c")])
    assert harness.done.wait(timeout=10)
    # The next batch runs as usual.
    harness.expected = 5
    harness.done.clear()
    harness.runner.submit([harness.item(stream, "after")])
    assert harness.done.wait(timeout=10)
    harness.close()

    assert harness.outcome("poison") == "failed: poisoned input"
    for data in ("a", "b", "c", "after"):
        assert harness.outcome(data) == "ran"
    assert harness.runner.stats.split_batches == 1
    assert harness.runner.stats.failed_items == 1
    assert model.batches[0] == ["a", "poison", "b", "c"]
    assert model.batches[-1] == ["after"]


def test_cancelled_item_dropped_as_overflow() -> None:
    model = RecordingModel(stateful=False, delay_s=0.3)
    harness = Harness(model, BatchingConfig(max_batch_size=1, max_queue_delay_ms=0))
    stream = owner("a")
    harness.expected = 3
    harness.runner.submit([harness.item(stream, "running")])
    time.sleep(0.1)
    superseded = harness.item(stream, "old frame")
    harness.runner.submit([superseded, harness.item(stream, "new frame")])
    superseded.cancel_message = "dropped for a newer frame"
    superseded.cancelled = True
    assert harness.done.wait(timeout=10)
    harness.close()
    assert harness.outcome("old frame") == "CHUNK_ERROR_REASON_OVERFLOW"
    assert harness.outcome("new frame") == "ran"
    assert model.batches == [["running"], ["new frame"]]
    assert harness.runner.stats.dropped_cancelled == 1


def test_item_past_deadline_not_run() -> None:
    model = RecordingModel(stateful=True)
    harness = Harness(model, BatchingConfig(max_batch_size=8, max_queue_delay_ms=0))
    harness.expected = 2
    harness.runner.submit([harness.item(owner("a"), "expired", deadline=time.monotonic() - 1)])
    harness.runner.submit([harness.item(owner("b"), "fresh", deadline=time.monotonic() + 30)])
    assert harness.done.wait(timeout=10)
    harness.close()
    assert harness.outcome("expired") == "CHUNK_ERROR_REASON_DEADLINE"
    assert harness.outcome("fresh") == "ran"
    assert ["expired"] not in model.batches
