"""Prometheus metrics of a streaminfer process, served on an HTTP ``/metrics`` port.

Every metric is defined here, with a ``streaminfer_`` prefix and its base
unit in the name (seconds, bytes, a ratio). Labels have low cardinality:
``model``, ``modality``, ``reason`` and ``code`` take values from a fixed set.
No label carries a stream id or a client address.

Two kinds of updates:

- Events are counted where they happen: a chunk read, a batch run, a stream
  ended. Per-chunk latency and its parts go into histograms whose buckets
  (``LATENCY_BUCKETS_S``) run from 1 ms to 10 s. The per-chunk histograms
  are ``BatchedHistogram``: an observation is a list append, and the values
  reach the histogram in bulk before each scrape and every sample tick.
- Levels (queue depths, credits outstanding, open streams, process memory)
  are sampled by ``Sampler`` every ``SAMPLE_INTERVAL_S``, so the hot path
  does not update them.

With ``serve --workers N`` each worker writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode) and the
parent process serves the sum. A gauge's mode sets how workers combine: ``livesum``
for amounts (queue depth, open streams), ``livemax`` for worst cases (loop
lag). The variable must be set before this module is imported, which
``workers.run_workers`` does for its workers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
    start_http_server,
)

from streaminfer.v1 import streaminfer_pb2 as pb

if TYPE_CHECKING:
    from streaminfer.server.executor import Executor
    from streaminfer.server.load import LoadMonitor
    from streaminfer.server.service import InferenceService

logger = logging.getLogger(__name__)

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
# The *_created series would double the page's size and carry nothing these metrics need.
disable_created_metrics()


class _Recorder:
    """Buffers one histogram child's observations; ``flush`` adds them in bulk.

    ``observe`` is the buffer's own ``append``, atomic under the GIL, so any
    thread may call it. ``flush`` takes the values there were when it
    started and deletes just those, so appends made meanwhile stay.
    """

    __slots__ = ("_child", "_values", "_bounds", "observe")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._values: list[float] = []
        self._bounds = np.asarray(child._upper_bounds, dtype=float)
        self.observe = self._values.append

    def flush(self) -> None:
        count = len(self._values)
        if not count:
            return
        values = np.asarray(self._values[:count], dtype=float)
        del self._values[:count]
        # Bucket i counts bound[i-1] < value <= bound[i], as Histogram.observe does.
        per_bucket = np.bincount(np.searchsorted(self._bounds, values, side="left"), minlength=len(self._bounds))
        for index in np.flatnonzero(per_bucket):
            self._child._buckets[index].inc(float(per_bucket[index]))
        self._child._sum.inc(float(values.sum()))


_recorders: list[_Recorder] = []
_flush_lock = threading.Lock()


def flush() -> None:
    """Add every buffered observation to its histogram."""
    with _flush_lock:
        for recorder in list(_recorders):
            recorder.flush()


class BatchedHistogram:
    """A Histogram for the hot path: ``labels(...)`` gives a recorder whose ``observe`` costs a list append.

    prometheus-client's own ``observe`` takes a lock and scans the bounds,
    about 2 us measured here. At thousands of chunks a second and several
    histograms per chunk, that is several percent of the server's CPU.
    """

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._by_labels: dict[tuple[str, ...], _Recorder] = {}
        self._lock = threading.Lock()

    def labels(self, *values: str) -> _Recorder:
        recorder = self._by_labels.get(values)
        if recorder is None:
            with self._lock:
                recorder = self._by_labels.get(values)
                if recorder is None:
                    child = self._histogram.labels(*values) if values else self._histogram
                    recorder = self._by_labels[values] = _Recorder(child)
                    with _flush_lock:
                        _recorders.append(recorder)
        return recorder

    @property
    def histogram(self) -> Histogram:
        """The prometheus-client Histogram the values go to."""
        return self._histogram

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def describe(self) -> Any:
        return self._histogram.describe()


class _FlushBeforeScrape:
    """Registered first, so a scrape of this process flushes the buffers before the histograms are read."""

    def collect(self) -> list[Any]:
        flush()
        return []


REGISTRY.register(_FlushBeforeScrape())

# Realtime latency: a 32 ms audio chunk should be acknowledged within tens
# of milliseconds. Seconds mean the server is far behind.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Stage times inside the server: from tens of microseconds up.
STAGE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Event-loop lag: a healthy loop wakes within a millisecond.
LOOP_LAG_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Items per batch, powers of two up to the largest max_batch_size in use.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
FILL_RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SAMPLE_INTERVAL_S = 1.0

MODALITY_LABELS = {pb.MODALITY_AUDIO: "audio", pb.MODALITY_VIDEO: "video", pb.MODALITY_TEXT: "text"}

# -- application -------------------------------------------------------------

STREAMS_ACTIVE = Gauge(
    "streaminfer_streams_active", "Streams open now.", multiprocess_mode="livesum"
)
STREAMS_STARTED = Counter("streaminfer_streams_started_total", "Streams admitted.")
REJECTION_REASONS = (
    "draining", "max_streams", "learned_max_streams", "busy", "queue_wait", "rate_limit", "unauthenticated"
)
STREAMS_REJECTED = Counter(
    "streaminfer_streams_rejected_total",
    f"Streams rejected before any work, by reason: {', '.join(REJECTION_REASONS)}.",
    ["reason"],
)
STREAMS_ENDED = Counter(
    "streaminfer_streams_ended_total", "Admitted streams that ended, by gRPC status code.", ["code"]
)
CHUNKS_RECEIVED = Counter("streaminfer_chunks_received_total", "Chunks read from clients.", ["modality"])
CHUNKS_PROCESSED = Counter(
    "streaminfer_chunks_processed_total", "Chunks acknowledged: every model of their modality completed them.", ["modality"]
)
CHUNKS_DROPPED = Counter(
    "streaminfer_chunks_dropped_total",
    "Chunks that got a ChunkError, by reason (the ChunkErrorReason, lower case).",
    ["modality", "reason"],
)
# NOTE: a chunk is acked when every model of its modality is done, so with two
# models on one modality both labels get the slower model's latency.
CHUNK_LATENCY = BatchedHistogram(Histogram(
    "streaminfer_chunk_latency_seconds",
    "From reading a chunk to writing its answer, per model of its modality.",
    ["model", "modality"],
    buckets=LATENCY_BUCKETS_S,
))
DECODE_WAIT = BatchedHistogram(Histogram(
    "streaminfer_decode_wait_seconds",
    "From reading a chunk to a decode thread starting on it.",
    ["modality"],
    buckets=STAGE_BUCKETS_S,
))
DECODE = BatchedHistogram(Histogram(
    "streaminfer_decode_seconds",
    "Decoding one chunk and preprocessing it for its models, on a decode thread.",
    ["modality"],
    buckets=STAGE_BUCKETS_S,
))
INPUT_WAIT = BatchedHistogram(Histogram(
    "streaminfer_input_wait_seconds",
    "From a chunk's decode to the queueing of the model input that completes it: the wait for later input "
    "(resampler look-ahead, a partial window, an unfinished sentence); 0 when the chunk's own input completes it.",
    ["model"],
    buckets=LATENCY_BUCKETS_S,
))
QUEUE_WAIT = BatchedHistogram(Histogram(
    "streaminfer_queue_wait_seconds",
    "From a work item entering its model's queue to its batch starting (items that need no inference included).",
    ["model"],
    buckets=LATENCY_BUCKETS_S,
))
INFERENCE = Histogram(
    "streaminfer_inference_seconds", "Running one batch through the model.", ["model"], buckets=LATENCY_BUCKETS_S
)
POSTPROCESS = Histogram(
    "streaminfer_postprocess_seconds",
    "Turning one batch's outputs into results.",
    ["model"],
    buckets=STAGE_BUCKETS_S,
)
WRITE = BatchedHistogram(Histogram(
    "streaminfer_write_seconds",
    "Writing one response message to a stream (HTTP/2 flow control included).",
    buckets=LATENCY_BUCKETS_S,
))
TIME_TO_FIRST_RESULT = Histogram(
    "streaminfer_time_to_first_result_seconds",
    "From a stream's admission to its first result written.",
    buckets=LATENCY_BUCKETS_S,
)
RESULTS = Counter("streaminfer_results_total", "Results written to clients.", ["model", "modality"])
INFER_REQUESTS = Counter("streaminfer_infer_requests_total", "Unary Infer calls, by gRPC status code.", ["code"])

# -- models ------------------------------------------------------------------

BATCH_SIZE = Histogram(
    "streaminfer_batch_size", "Work items per batch.", ["model"], buckets=BATCH_SIZE_BUCKETS
)
BATCH_FILL = Histogram(
    "streaminfer_batch_fill_ratio", "Items per batch over the model's max_batch_size.", ["model"], buckets=FILL_RATIO_BUCKETS
)
BATCHES = Counter(
    "streaminfer_batches_total", "Batches run, by why they closed: full, or delay (max_queue_delay_ms).", ["model", "reason"]
)
ITEMS_FAILED = Counter(
    "streaminfer_model_failed_items_total", "Work items whose inference or postprocessing raised.", ["model"]
)
QUEUE_DEPTH = Gauge(
    "streaminfer_queue_depth", "Work items waiting in the model's queue.", ["model"], multiprocess_mode="livesum"
)
QUEUE_LIMIT = Gauge(
    "streaminfer_queue_limit", "The model's max_queue_size.", ["model"], multiprocess_mode="livemax"
)
QUEUE_OLDEST_AGE = Gauge(
    "streaminfer_queue_oldest_age_seconds",
    "Age of the oldest work item waiting in the model's queue.",
    ["model"],
    multiprocess_mode="livemax",
)
MAX_BATCH_SIZE = Gauge(
    "streaminfer_max_batch_size", "The model's max_batch_size.", ["model"], multiprocess_mode="livemax"
)
INSTANCES = Gauge(
    "streaminfer_model_instances", "Inference workers of the model.", ["model"], multiprocess_mode="livesum"
)
BUSY_INSTANCES = Gauge(
    "streaminfer_model_busy_instances", "Inference workers running a batch now.", ["model"], multiprocess_mode="livesum"
)
MODEL_HEALTHY = Gauge(
    "streaminfer_model_healthy", "1 while no batch of the model runs past the hang timeout.", ["model"], multiprocess_mode="livemin"
)
MODEL_LOAD = Gauge(
    "streaminfer_model_load_seconds", "Time the model took to load at start-up.", ["model"], multiprocess_mode="max"
)
CACHE_REQUESTS = Counter(
    "streaminfer_cache_requests_total", "Lookups in a model's cache, by result: hit or miss.", ["model", "cache", "result"]
)

# -- flow control and load ---------------------------------------------------

CHUNKS_IN_FLIGHT = Gauge(
    "streaminfer_chunks_in_flight",
    "Chunks read and not yet answered, over all streams (credits outstanding).",
    multiprocess_mode="livesum",
)
STREAMS_PAUSED = Gauge(
    "streaminfer_streams_paused",
    "Streams the server stops reading because their in-flight window is full.",
    multiprocess_mode="livesum",
)
WINDOW_OVERRUNS = Counter(
    "streaminfer_window_overruns_total", "Streams whose client sent beyond its in-flight window."
)
LOOP_LAG = Histogram(
    "streaminfer_event_loop_lag_seconds",
    "How late the event loop ran a timer, probed every 20 ms.",
    buckets=LOOP_LAG_BUCKETS_S,
)
PROJECTED_WAIT = Gauge(
    "streaminfer_projected_wait_seconds",
    "The queue wait a new stream would see, which admission compares with admission.max_queue_wait_ms.",
    multiprocess_mode="livemax",
)
BUSY_FRACTION = Gauge(
    "streaminfer_busy_fraction",
    "Share of the last second the event loop was busy (running, or waiting for a CPU or the GIL) instead of waiting "
    "for network events; admission projects it for each new stream against admission.max_busy_fraction. It is "
    "sampled only while that check is on and Linux /proc allows it, and reads 0 otherwise.",
    multiprocess_mode="livemax",
)
MAX_BUSY_FRACTION = Gauge(
    "streaminfer_max_busy_fraction",
    "admission.max_busy_fraction of the process; 0 while the check is off, by configuration or because /proc "
    "cannot be read.",
    multiprocess_mode="livemax",
)
AUDIO_BACKLOG = Gauge(
    "streaminfer_audio_backlog_seconds",
    "Median over real-time audio streams of how far the server reads behind the client's pace.",
    multiprocess_mode="livemax",
)
BUSY_CAPACITY = Gauge(
    "streaminfer_busy_capacity_streams",
    "Open streams at which the busy-fraction check rejects the next one, from the cost per stream learned in steady "
    "seconds, with no new streams arriving; the measured fraction, or the room kept for arriving streams, may reject "
    "sooner. 0 before the cost is learned or while the check is off.",
    multiprocess_mode="livesum",
)
BUSY_ARRIVAL_RESERVE = Gauge(
    "streaminfer_busy_arrival_reserve",
    "Share of the event loop the busy-fraction check keeps free for the new streams that arrived over the last "
    "second, admitted or rejected, at most 0.05; 0 before the cost of a stream is learned or while the check is off.",
    multiprocess_mode="livemax",
)
LEARNED_MAX_STREAMS = Gauge(
    "streaminfer_learned_max_streams",
    "The stream cap learned from overloads (admission.learn_max_streams); 0 while none.",
    multiprocess_mode="livesum",
)
MAX_STREAMS = Gauge(
    "streaminfer_max_streams", "admission.max_streams of the process.", multiprocess_mode="livesum"
)
STREAMS_ENDED_BY_SERVER = Counter(
    "streaminfer_streams_ended_by_server_total",
    "Streams the server ended itself, by reason: write_timeout, max_duration, idle_timeout, draining.",
    ["reason"],
)

# -- resources ---------------------------------------------------------------

PROCESS_CPU = Counter("streaminfer_process_cpu_seconds_total", "CPU time of the server process(es), user and system.")
PROCESS_MEMORY = Gauge(
    "streaminfer_process_resident_memory_bytes", "Resident memory of the server process(es).", multiprocess_mode="livesum"
)
CPU_CORES = Gauge("streaminfer_cpu_cores", "CPU cores the machine has.", multiprocess_mode="livemax")
DECODE_QUEUE_DEPTH = Gauge(
    "streaminfer_decode_queue_depth", "Decode jobs waiting for a decode thread.", multiprocess_mode="livesum"
)
DECODE_THREADS = Gauge("streaminfer_decode_threads", "Decode threads.", multiprocess_mode="livesum")
DECODE_BUSY = Counter("streaminfer_decode_busy_seconds_total", "Time decode threads spent running jobs.")
GPU_MEMORY_USED = Gauge(
    "streaminfer_gpu_memory_used_bytes", "GPU memory in use (NVML), per device index.", ["gpu"], multiprocess_mode="livemax"
)
GPU_MEMORY_TOTAL = Gauge(
    "streaminfer_gpu_memory_total_bytes", "GPU memory of the device (NVML).", ["gpu"], multiprocess_mode="livemax"
)
GPU_UTILIZATION = Gauge(
    "streaminfer_gpu_utilization_ratio",
    "Fraction of the last sample period in which a kernel ran on the GPU (NVML).",
    ["gpu"],
    multiprocess_mode="livemax",
)


class _Off:
    """Stands in for every metric when metrics are off: each update is a no-op."""

    def labels(self, *values: str) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


def disable() -> None:
    """Turn every update into a no-op for the rest of the process (``metrics_port = -1``).

    Call it before the executor starts: runners and streams keep the metric
    objects they look up when they are made.
    """
    off = _Off()
    for name, value in list(globals().items()):
        if name.isupper() and isinstance(value, (Counter, Gauge, Histogram, BatchedHistogram)):
            globals()[name] = off


def reason_label(reason: int) -> str:
    """Return the label of a ChunkErrorReason: CHUNK_ERROR_REASON_DEADLINE -> deadline."""
    try:
        return pb.ChunkErrorReason.Name(reason).removeprefix("CHUNK_ERROR_REASON_").lower()
    except ValueError:
        return str(reason)


def modality_label(modality: int) -> str:
    return MODALITY_LABELS.get(modality, "unspecified")


class _Gpus:
    """GPU memory and utilisation through NVML; inactive when NVML or a GPU is missing.

    NOTE: only the inactive path has run; no GPU was available to test the NVML readings.
    """

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml = pynvml
        except Exception as error:  # ImportError, or NVMLError without a driver
            logger.debug("no GPU metrics: %s", error)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def sample(self) -> None:
        for index, handle in enumerate(self._handles):
            try:
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                utilization = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            except Exception as error:
                logger.debug("NVML read of GPU %d failed: %s", index, error)
                continue
            GPU_MEMORY_USED.labels(str(index)).set(memory.used)
            GPU_MEMORY_TOTAL.labels(str(index)).set(memory.total)
            GPU_UTILIZATION.labels(str(index)).set(utilization.gpu / 100.0)


class Sampler:
    """Sets the sampled gauges from the live server; the load monitor calls ``sample`` every tick it checks."""

    def __init__(self, executor: Executor, service: InferenceService, monitor: LoadMonitor) -> None:
        self._executor = executor
        self._service = service
        self._monitor = monitor
        self._gpus = _Gpus()
        self._decode_busy = executor.decode.stats.busy_seconds
        self._sampled_at = -float("inf")
        CPU_CORES.set(os.cpu_count() or 1)
        MAX_STREAMS.set(executor.config.admission.max_streams)
        DECODE_THREADS.set(executor.decode.lanes)
        # Every reason is exported from the start, at 0, so that rate() over it works before the first rejection.
        for reason in REJECTION_REASONS:
            STREAMS_REJECTED.labels(reason)
        for name, runner in executor.runners.items():
            INSTANCES.labels(name).set(runner.config.instances)
            MAX_BATCH_SIZE.labels(name).set(runner.config.batching.max_batch_size)
            QUEUE_LIMIT.labels(name).set(runner.config.batching.max_queue_size)
            MODEL_LOAD.labels(name).set(executor.load_seconds.get(name, 0.0))

    def sample(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._sampled_at < SAMPLE_INTERVAL_S:
            return
        self._sampled_at = now
        flush()
        sessions = list(self._service.active_sessions)
        STREAMS_ACTIVE.set(len(sessions))
        CHUNKS_IN_FLIGHT.set(sum(session.in_flight for session in sessions))
        STREAMS_PAUSED.set(sum(1 for session in sessions if session.waiting_for_window))
        PROJECTED_WAIT.set(self._monitor.projected_wait_s())
        AUDIO_BACKLOG.set(self._monitor.audio_backlog_s)
        BUSY_FRACTION.set(self._monitor.busy_fraction() or 0.0)
        MAX_BUSY_FRACTION.set(self._monitor.busy_limit)
        BUSY_CAPACITY.set(self._monitor.busy_capacity() or 0)
        BUSY_ARRIVAL_RESERVE.set(round(self._monitor.busy_arrival_reserve() or 0.0, 4))
        LEARNED_MAX_STREAMS.set(self._monitor.learned_max_streams or 0)

        unhealthy = self._monitor.unhealthy_models
        for name, runner in self._executor.runners.items():
            QUEUE_DEPTH.labels(name).set(runner.queue_depth)
            QUEUE_OLDEST_AGE.labels(name).set(runner.oldest_queued_age_s())
            BUSY_INSTANCES.labels(name).set(runner.busy_instances)
            MODEL_HEALTHY.labels(name).set(0 if name in unhealthy else 1)

        decode = self._executor.decode
        DECODE_QUEUE_DEPTH.set(decode.queue_depth)
        busy = decode.stats.busy_seconds
        DECODE_BUSY.inc(max(0.0, busy - self._decode_busy))
        self._decode_busy = busy

        _count_process_cpu()
        PROCESS_MEMORY.set(_resident_memory_bytes())
        if self._gpus.active:
            self._gpus.sample()


# Process CPU time already counted: one baseline for the process, so that two
# servers in one process (as in tests) do not count it twice.
_cpu_counted = [0.0]
_cpu_lock = threading.Lock()


def _count_process_cpu() -> None:
    with _cpu_lock:
        cpu = _process_cpu_seconds()
        PROCESS_CPU.inc(max(0.0, cpu - _cpu_counted[0]))
        _cpu_counted[0] = max(cpu, _cpu_counted[0])


def _process_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _resident_memory_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as file:
            pages = int(file.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        # ru_maxrss is the peak, in KiB on Linux: the best figure left.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def start_server(host: str, port: int) -> tuple[Any, int]:
    """Serve ``/metrics`` on ``host:port`` (0 picks a free port); return the HTTP server and the bound port.

    In multiprocess mode the page is the sum over every worker's files.
    """
    registry: CollectorRegistry = REGISTRY
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    try:
        server, _thread = start_http_server(port, addr=host.strip("[]"), registry=registry)
    except OSError as error:
        raise OSError(
            f"cannot serve metrics on {host}:{port}: {error}; pick another port with --metrics-port "
            "(0 picks a free one, -1 turns metrics off)"
        ) from error
    return server, server.server_port


def families_by_name(text: str) -> dict[str, Any]:
    """Parse a ``/metrics`` page into metric families keyed by name (without _total for counters)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {family.name: family for family in text_string_to_metric_families(text)}


def exported_names() -> Iterable[str]:
    """Yield every sample name this module can export: histograms add _bucket, _sum and _count, counters _total."""
    for collector in (
        value
        for name, value in globals().items()
        if isinstance(value, (Counter, Gauge, Histogram, BatchedHistogram)) and name.isupper()
    ):
        for family in collector.describe():
            if family.type == "histogram":
                yield from (f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count")
            elif family.type == "counter":
                yield f"{family.name}_total"
            else:
                yield family.name
