"""How far behind the server is, how close to its limit, and the timers that end streams and flag hung models.

LoadMonitor runs on the event loop. Every tick it measures the loop's lag: how
late a timer fires, which is how long any message waits before the loop
handles it. The projected queue wait of a new stream is the largest of four
measures: the loop lag, the decode backlog, each model's queued batches times
its batch time, and the median audio backlog. The audio backlog is how far the
server reads real-time audio streams behind the pace their clients send at.
Admission control compares the projection with its budget.

Queue waits show an overload only once it has begun. The busy fraction shows
it coming: the share of time the event loop thread spends on work instead of
waiting for network events, which rises with the open streams up to
saturation, a little faster than in proportion. A sampler thread reads the
loop thread's current system call from /proc every few milliseconds; a
sample is idle while the loop waits in epoll, and busy otherwise (running,
waiting for a CPU or the GIL). Admission projects the fraction for one more
stream from the cost per stream learned in steady seconds, raised for a
busier loop, so a fast ramp of new streams is stopped before they all start
sending. While streams arrive fast it keeps room for the work of setting up
or rejecting them.

Every ``CHECK_INTERVAL_S`` it also ends streams that passed a time limit
(idle, maximum duration), aborts streams whose client stopped reading
results, and marks a model unhealthy while one of its batches has run longer
than the hang timeout.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import os
import platform
import random
import select
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc

from streaminfer.server import metrics
from streaminfer.v1 import streaminfer_pb2 as pb

if TYPE_CHECKING:
    from streaminfer.server.executor import Executor
    from streaminfer.server.service import InferenceService

logger = logging.getLogger(__name__)

TICK_S = 0.02
# Learned stream cap: checks in a row under CALM_FRACTION of the budget that
# make the stream count calm, the calm seconds at the cap before it rises, and by how much.
CALM_CHECKS = 4
# A check is calm while the projected wait is under this fraction of the budget.
CALM_FRACTION = 0.5
PROBE_AFTER_S = 10.0
PROBE_STEP = 0.05
CHECK_INTERVAL_S = 0.25
# Loop lag is the largest of the last this many ticks (about one second).
LAG_WINDOW_TICKS = 50
# The loop sampler sleeps a random 0.5 to 1.5 times this between samples.
SAMPLE_MEAN_SLEEP_S = 0.005
# System calls in which the event loop waits for network events, by
# platform.machine(): epoll_wait, epoll_pwait and epoll_pwait2 on x86-64;
# epoll_pwait and epoll_pwait2 on 64-bit Arm, which has no epoll_wait.
LOOP_WAIT_SYSCALLS = {
    "x86_64": frozenset({232, 281, 441}),
    "aarch64": frozenset({22, 441}),
}
# The busy fraction covers the last this many checks (one second), and needs
# this many samples to be measured at all.
BUSY_WINDOW_CHECKS = 4
BUSY_MIN_SAMPLES = 20
# Maximum seconds the start-up check of the epoll call numbers may take.
CALIBRATION_TIMEOUT_S = 1.0
# The cost of one stream is learned once this many streams were open on
# average over the measured second. With fewer, it is lost in sampling noise.
PROJECT_MIN_STREAMS = 8
# A second is steady when the streams admitted, rejected or ended within it
# are at most this share of those open. Opening and rejecting streams costs
# more than carrying them, and an ended stream's load stays in the measure
# for up to a second, so both make each stream look dearer than it is.
STEADY_NEW_SHARE = 0.05
# The cost per stream is learned from seconds with the busy fraction at most
# this (or the limit, if higher). Above it the event loop is close to never
# waiting, so the fraction no longer grows with the streams.
COST_CEILING = 0.95
# Weights per check of the exponential averages: the idle server's busy
# fraction (while no stream is open) and the steady cost per stream. The
# cost averages about the last 20 steady checks (5 s of steady load),
# because near the limit the one-second cost moves by about 5 % from one
# second to the next on the 2-core test machine.
IDLE_WEIGHT = 0.1
COST_WEIGHT = 0.05
# A stream costs more the busier the loop, because all work waits longer
# for the CPUs and the GIL. A cost learned at busy fraction b0 counts as
# cost * (1 + COST_GROWTH * (b - b0)) at fraction b: 5 % per 0.1 with 0.5.
# NOTE: an estimate. Four runs on the 2-core test machine measured 0.27 to 0.93.
COST_GROWTH = 0.5
# Event loop seconds each new stream costs as it arrives, admitted or
# rejected: gRPC sets up the call, and the server reads its config and sends
# the first reply or the rejection. A projection keeps this much of the loop
# free per stream that arrived in the last second, up to ARRIVAL_RESERVE_MAX.
# The room is needed because a burst's streams are all admitted before its
# rejections begin, and rejections on a full loop push the admitted streams
# over their budget. The cap keeps a fast burst from shutting most of it out.
# At 3 times capacity on the 2-core test machine, no admitted streams missed
# their budget with a cap of 0.1 or 0.05. With 0.1, two of six sweeps kept
# under 0.9 of the streams admission off carried (0.855, 0.88); with 0.05,
# two of nine did (0.84, and 0.63 where admission off carried 300).
# NOTE: estimates. The 2-core test machine spent 0.73 to 0.92 ms of event
# loop CPU per rejected stream, and a faster machine spends less.
ARRIVAL_COST_S = 0.0008
ARRIVAL_RESERVE_MAX = 0.05
# Until the cost of a stream is known, at most this many streams, or twice
# those open over the last second, are admitted: a burst that opens within
# one check would be in before anything was measured.
COLD_START_STREAMS = 64


class LoopSamplingUnavailable(Exception):
    """Raised when the event loop thread's system call cannot be read here; the message gives the reason."""


def open_thread_syscall() -> int:
    """Open the calling thread's /proc system call file and return its descriptor.

    Call it on the event loop thread. It first checks, with a thread made to
    block in epoll, that this machine's epoll waits read as the numbers in
    ``LOOP_WAIT_SYSCALLS``: a 32-bit or emulated process on another
    architecture's kernel would read every sample as busy. Raises
    LoopSamplingUnavailable with the reason.
    """
    if not sys.platform.startswith("linux"):
        raise LoopSamplingUnavailable(f"the event loop is sampled from Linux /proc, and this is {sys.platform}")
    machine = platform.machine()
    wait_calls = LOOP_WAIT_SYSCALLS.get(machine)
    if wait_calls is None:
        raise LoopSamplingUnavailable(f"the epoll system call numbers of machine {machine!r} are not known (known: x86_64, aarch64)")
    expected = _wait_call_fields()
    seen = _blocked_in_epoll_reads(expected)
    if seen not in expected:
        raise LoopSamplingUnavailable(
            f"a thread blocked in epoll reads as system call {seen.decode(errors='replace')!r} in /proc, not one of "
            f"{sorted(wait_calls)} (the numbers for {machine}); the process may run on another architecture's kernel"
        )
    return _open_syscall_file()


def loop_sampling_unavailable() -> str | None:
    """Return why the calling thread's system call cannot be sampled here, or None when it can."""
    try:
        os.close(open_thread_syscall())
    except LoopSamplingUnavailable as error:
        return str(error)
    return None


def _wait_call_fields() -> frozenset[bytes]:
    """Return the first fields of /proc/.../syscall that mean a wait in epoll on this machine."""
    return frozenset(str(number).encode() for number in LOOP_WAIT_SYSCALLS[platform.machine()])


def _open_syscall_file() -> int:
    """Open /proc/thread-self/syscall (Linux 3.17 and later) for the calling thread, read it once, and return it."""
    path = "/proc/thread-self/syscall"
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError as error:
        raise LoopSamplingUnavailable(f"opening {path} failed ({error.strerror or error})") from error
    try:
        os.pread(descriptor, 64, 0)
    except OSError as error:
        os.close(descriptor)
        raise LoopSamplingUnavailable(f"reading {path} failed ({error.strerror or error})") from error
    return descriptor


def _blocked_in_epoll_reads(expected: frozenset[bytes]) -> bytes:
    """Return the first field of the /proc system call file of a thread blocked in epoll.

    It is read until it is one of ``expected`` or half of CALIBRATION_TIMEOUT_S has passed.
    """
    opened: list[int] = []
    failures: list[LoopSamplingUnavailable] = []
    ready = threading.Event()
    reader, writer = socket.socketpair()

    def wait() -> None:
        try:
            opened.append(_open_syscall_file())
        except LoopSamplingUnavailable as error:
            failures.append(error)
            ready.set()
            return
        with select.epoll() as poller:
            poller.register(reader.fileno(), select.EPOLLIN)
            ready.set()
            poller.poll(CALIBRATION_TIMEOUT_S)

    thread = threading.Thread(target=wait, name="epoll-calibration", daemon=True)
    with reader, writer:
        thread.start()
        ready.wait(CALIBRATION_TIMEOUT_S)
        if failures:
            thread.join()
            raise failures[0]
        if not opened:
            raise LoopSamplingUnavailable(f"the epoll check thread did not start within {CALIBRATION_TIMEOUT_S:g} s")
        seen = b""
        try:
            # Until the thread is in epoll it reads as running or as another call; wait for it, within the time.
            deadline = time.monotonic() + CALIBRATION_TIMEOUT_S / 2
            while True:
                seen = os.pread(opened[0], 64, 0).split(b" ", 1)[0].strip()
                if seen in expected or time.monotonic() > deadline:
                    break
                time.sleep(0.005)
        finally:
            writer.send(b"x")
            thread.join()
            os.close(opened[0])
    return seen


class LoopSampler:
    """A thread that looks every few milliseconds whether the event loop thread is waiting for network events.

    It reads the loop thread's /proc system call file (opened by
    ``open_thread_syscall`` on that thread): the number of the system call
    the thread is blocked in, or "running" while it runs or waits for a CPU.
    Waiting in epoll is idle; anything else is busy, including a wait for the
    GIL (a futex). Random spells keep the samples from locking onto a
    periodic task.

    The sampler needs the GIL to take a sample. While the loop runs Python
    code, a sample waits until the loop lets go of the GIL: at the switch
    interval, in a call that releases it, or on entering epoll, and in the
    last case it reads idle. So busy spells shorter than the switch interval
    read partly idle, and the fraction reads lower than the loop's true share
    at light load. It still reaches 1 when the loop never waits.
    """

    def __init__(self, descriptor: int, mean_sleep_s: float = SAMPLE_MEAN_SLEEP_S) -> None:
        self._descriptor = descriptor
        self._wait_calls = _wait_call_fields()
        self._mean_sleep_s = mean_sleep_s
        self._lock = threading.Lock()
        self._samples = 0
        self._busy = 0
        # Why the sampler stopped on its own; None while it runs.
        self.failure: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loop-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)

    def take(self) -> tuple[int, int]:
        """Return the samples since the last call and how many of them found the loop busy."""
        with self._lock:
            counts = self._samples, self._busy
            self._samples = self._busy = 0
        return counts

    def _run(self) -> None:
        spells = random.Random()
        try:
            while not self._stop.wait(self._mean_sleep_s * (0.5 + spells.random())):
                try:
                    call = os.pread(self._descriptor, 64, 0).split(b" ", 1)[0]
                except OSError as error:
                    # The loop thread has ended, or /proc went away.
                    self.failure = f"reading the event loop's /proc system call file failed ({error.strerror or error})"
                    return
                with self._lock:
                    self._samples += 1
                    self._busy += call not in self._wait_calls
        finally:
            os.close(self._descriptor)


@dataclasses.dataclass(frozen=True, slots=True)
class BusyProjection:
    """The busy fraction measured over the last second, and what one more stream would make it."""

    measured: float
    projected: float
    # Open streams, averaged over the measured second.
    streams: float
    # Set while the cost of a stream is not known yet: the maximum number of streams admitted until it is.
    cold_start_limit: int | None = None
    # New streams that arrived over the last second, and the share of the loop kept free for such arrivals.
    arrivals_per_s: float = 0.0
    reserve: float = 0.0


class BusyMeter:
    """The busy fraction over the last second, and what each open stream adds to it.

    The cost of a stream is the busy fraction above the idle server's, over
    the streams open while it was measured. It is learned from steady
    seconds with the fraction at most ``COST_CEILING`` (or ``limit`` if that
    is higher). Until there has been one, the cost over the last second is
    used. Near 1 the fraction flattens as the loop saturates, so more
    streams would look cheaper each and let still more in. Between the limit
    and the ceiling it still prices streams fairly, so after a burst that let
    in more streams than the limit allows, the higher price lowers the count
    the next burst gets.

    The busy fraction grows faster than the streams: each one waits longer
    for the CPUs and the GIL the busier the process is. So the cost is kept
    with the fraction it was learned at, and a projection to a higher
    fraction raises it by ``COST_GROWTH`` per unit of fraction. On top of
    the streams, a projection keeps ``ARRIVAL_COST_S`` of the loop free for
    each new stream that arrived in the last second, up to
    ``ARRIVAL_RESERVE_MAX``.
    """

    def __init__(self, limit: float) -> None:
        self._limit = limit
        # Per check: samples, busy samples, the open streams weighted by the share of the check they were open,
        # the streams admitted, rejected or ended during it, and those admitted or rejected (arrivals).
        self._checks: collections.deque[tuple[int, int, float, int, int]] = collections.deque(maxlen=BUSY_WINDOW_CHECKS)
        self.idle_fraction = 0.0
        self.steady_cost: float | None = None
        # Busy fraction of the checks steady_cost was learned from, averaged with the same weights.
        self.steady_fraction = 0.0

    def add_check(self, samples: int, busy: int, streams: float, changed_streams: int, arrivals: int = 0) -> None:
        """Count one check's samples, busy samples and open streams, with the streams that changed and arrived.

        ``changed_streams`` counts those admitted, rejected or ended during
        the check, and ``arrivals`` those admitted or rejected.
        """
        self._checks.append((samples, busy, streams, changed_streams, arrivals))
        changes = sum(check[3] for check in self._checks)
        measured, streams_open = self.fraction(), self.streams()
        if measured is None or len(self._checks) < BUSY_WINDOW_CHECKS:
            return
        if streams_open == 0 and changes == 0:
            self.idle_fraction += IDLE_WEIGHT * (measured - self.idle_fraction)
        elif (
            streams_open >= PROJECT_MIN_STREAMS
            and changes <= STEADY_NEW_SHARE * streams_open
            and measured <= max(self._limit, COST_CEILING)
        ):
            cost = self._cost_per_stream(measured, streams_open)
            if self.steady_cost is None:
                self.steady_cost, self.steady_fraction = cost, measured
            else:
                self.steady_cost += COST_WEIGHT * (cost - self.steady_cost)
                self.steady_fraction += COST_WEIGHT * (measured - self.steady_fraction)

    def _cost_per_stream(self, measured: float, streams: float) -> float:
        """Return the busy fraction above the idle server's, divided over ``streams``."""
        return max(0.0, measured - self.idle_fraction) / streams

    def fraction(self) -> float | None:
        """Return the share of the last second's samples that found the loop busy; None before enough samples."""
        samples = sum(check[0] for check in self._checks)
        if samples < BUSY_MIN_SAMPLES:
            return None
        return sum(check[1] for check in self._checks) / samples

    def streams(self) -> float:
        """Return the streams open over the last second, on average."""
        return sum(check[2] for check in self._checks) / len(self._checks) if self._checks else 0.0

    def arrivals_per_s(self) -> float:
        """Return the new streams, admitted or rejected, that arrived per second over the last checks."""
        if not self._checks:
            return 0.0
        return sum(check[4] for check in self._checks) / (len(self._checks) * CHECK_INTERVAL_S)

    def project(self, open_streams: int) -> BusyProjection:
        """Project the busy fraction with one stream more than ``open_streams``.

        Streams admitted in the last second count at the cost per stream
        though their load has not shown yet, which is what stops a burst of
        new streams: queue waits would let them all in. The arrivals of the
        last second add their reserve. The projection is never under the
        measured fraction, which reads 0 before enough samples.
        """
        measured = self.fraction() or 0.0
        streams = self.streams()
        cost, learned_at = self.steady_cost, self.steady_fraction
        if cost is None and streams >= PROJECT_MIN_STREAMS:
            cost, learned_at = self._cost_per_stream(measured, streams), measured
        if cost is None:
            return BusyProjection(measured, measured, streams, max(COLD_START_STREAMS, int(2 * streams)))
        arrivals = self.arrivals_per_s()
        reserve = min(ARRIVAL_RESERVE_MAX, arrivals * ARRIVAL_COST_S)
        projected = max(measured, self._fraction_with(open_streams + 1, cost, learned_at) + reserve)
        return BusyProjection(measured, projected, streams, arrivals_per_s=arrivals, reserve=reserve)

    def capacity(self) -> int | None:
        """Return the most open streams the steady cost keeps within the limit; None before the cost is learned.

        It is the count with no new streams arriving: the reserve for
        arrivals, and the measured fraction, may reject streams before it.
        """
        if self.steady_cost is None:
            return None
        price = _cost_at(self.steady_cost, self.steady_fraction, self._limit)
        if price <= 0.0:
            return None
        return max(0, math.floor((self._limit - self.idle_fraction) / price + 1e-9))

    def _fraction_with(self, streams: int, cost: float, learned_at: float) -> float:
        """Return the busy fraction b with ``streams`` open, each costing ``cost`` learned at fraction ``learned_at``.

        b solves b = idle + streams * _cost_at(cost, learned_at, b). Where no
        b up to 1 carries the streams, they are priced at b = 1, which
        projects over 1.
        """
        load = streams * cost
        left = 1.0 - load * COST_GROWTH
        at_full = self.idle_fraction + streams * _cost_at(cost, learned_at, 1.0)
        if left <= 0.0:
            return at_full
        return min(at_full, (self.idle_fraction + load * (1.0 - COST_GROWTH * learned_at)) / left)


def _cost_at(cost: float, learned_at: float, fraction: float) -> float:
    """Return the cost of a stream at busy fraction ``fraction``, from ``cost`` learned at ``learned_at``."""
    return cost * (1.0 + COST_GROWTH * (fraction - learned_at))


class LoadMonitor:
    def __init__(
        self,
        executor: Executor,
        service: InferenceService,
        on_health_change: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self._executor = executor
        self._service = service
        self._limits = executor.config.limits
        self._on_health_change = on_health_change
        self._lags: collections.deque[float] = collections.deque(maxlen=LAG_WINDOW_TICKS)
        self._task: asyncio.Task[None] | None = None
        self.unhealthy_models: set[str] = set()
        # Median audio backlog of the open streams, seconds; see _measure_audio_backlog.
        self.audio_backlog_s = 0.0
        # The learned stream cap (admission.learn_max_streams), None until the first overload.
        self.learned_max_streams: int | None = None
        self._calm_streams = 0
        self._calm_checks = 0
        self._calm_since = 0.0
        self.streams_ended = collections.Counter[str]()
        # The sampler runs while admission uses the busy fraction (admission.max_busy_fraction) and /proc allows it.
        self._sampler: LoopSampler | None = None
        self.busy = BusyMeter(executor.config.admission.max_busy_fraction)
        self._busy_checked_at = time.monotonic()
        self._open_before = 0
        self._rejected_before = 0
        # Sets the sampled metrics; the server installs it once the models are loaded.
        self.sampler: metrics.Sampler | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="load-monitor")
        if self._executor.config.admission.max_busy_fraction <= 0:
            return
        try:
            # Called on the event loop, so this opens the loop thread's file.
            descriptor = open_thread_syscall()
        except LoopSamplingUnavailable as error:
            logger.warning(
                "admission.max_busy_fraction is %g, but the event loop's busy fraction cannot be measured here: %s. "
                "The busy-fraction check is off; admission.max_streams and admission.max_queue_wait_ms still apply",
                self._executor.config.admission.max_busy_fraction,
                error,
            )
            return
        self._sampler = LoopSampler(descriptor)
        self._sampler.start()

    @property
    def busy_limit(self) -> float:
        """Return admission.max_busy_fraction while the busy fraction is measured, and 0 while the check is off."""
        return self._executor.config.admission.max_busy_fraction if self._sampler is not None else 0.0

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sampler is not None:
            await asyncio.to_thread(self._sampler.stop)

    def loop_lag_s(self) -> float:
        return max(self._lags, default=0.0)

    def decode_wait_s(self) -> float:
        decode = self._executor.decode
        stats = decode.stats
        if not stats.jobs:
            return 0.0
        return decode.queue_depth * (stats.busy_seconds / stats.jobs) / decode.lanes

    def projected_wait_s(self) -> float:
        """Seconds a chunk of a new stream would wait in queues before inference starts."""
        return self._largest_wait()[0]

    def projected_wait(self) -> tuple[float, str]:
        """Return the projected wait in seconds and what it comes from, in words."""
        wait_s, source = self._largest_wait()
        if source == "loop":
            return wait_s, "event-loop lag"
        if source == "decode":
            return wait_s, f"decode backlog of {self._executor.decode.queue_depth} hand-off(s)"
        if source == "audio":
            return wait_s, "audio read behind the clients' pace"
        return wait_s, f"model {source}: {self._executor.runners[source].queue_depth} item(s) queued"

    def _largest_wait(self) -> tuple[float, str]:
        """Return the largest of the wait measures and its source: loop, decode, audio or a model name."""
        measures = [(self.loop_lag_s(), "loop"), (self.decode_wait_s(), "decode"), (self.audio_backlog_s, "audio")]
        measures += [(runner.projected_wait_s(), name) for name, runner in self._executor.runners.items()]
        return max(measures, key=lambda measure: measure[0])

    def busy_fraction(self) -> float | None:
        """Return the share of the last second the event loop was busy; None before enough samples or while not sampled."""
        if self._sampler is None:
            return None
        return self.busy.fraction()

    def busy_capacity(self) -> int | None:
        """Return the most open streams the busy-fraction check allows; None before the cost is learned or while not sampled."""
        if self._sampler is None:
            return None
        return self.busy.capacity()

    def busy_arrival_reserve(self) -> float | None:
        """Return the share of the loop the busy-fraction check keeps for arriving streams; None while not sampled.

        It is 0 before the cost of a stream is known, when projections do not apply it.
        """
        projection = self.busy_projection()
        return None if projection is None else projection.reserve

    def busy_projection(self) -> BusyProjection | None:
        """Project the busy fraction with one more stream; None while the busy fraction is not measured."""
        if self._sampler is None:
            return None
        return self.busy.project(len(self._service.active_sessions))

    def _measure_busy(self) -> None:
        """Count the loop samples since the last check, and the streams open, admitted, rejected and ended meanwhile."""
        now = time.monotonic()
        since = self._busy_checked_at
        self._busy_checked_at = now
        streams = 0.0
        admitted = 0
        for session in self._service.active_sessions:
            streams += min(1.0, (now - session.started_at) / CHECK_INTERVAL_S)
            admitted += session.started_at > since
        open_now = len(self._service.active_sessions)
        ended = self._open_before + admitted - open_now
        rejected = sum(self._service.rejected.values())
        samples, busy = self._sampler.take()
        arrivals = admitted + rejected - self._rejected_before
        self.busy.add_check(samples, busy, streams, arrivals + ended, arrivals)
        if self._sampler.failure is not None:
            logger.error("%s; the busy-fraction check is off from now on", self._sampler.failure)
            # The thread has returned already, so this does not wait.
            self._sampler.stop()
            self._sampler = None
        self._open_before = open_now
        self._rejected_before = rejected

    def _measure_audio_backlog(self) -> None:
        """Take the median over streams of how far their audio is read behind the client's pace.

        It measures a wait the queues miss: when the process runs out of CPU,
        chunks wait in sockets and HTTP/2 buffers before the server reads them.
        """
        now = time.monotonic()
        backlogs = sorted(
            backlog
            for session in self._service.active_sessions
            if (backlog := session.audio_backlog_s(now)) is not None
        )
        self.audio_backlog_s = backlogs[len(backlogs) // 2] if backlogs else 0.0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_check = loop.time() + CHECK_INTERVAL_S
        while True:
            expected = loop.time() + TICK_S
            await asyncio.sleep(TICK_S)
            now = loop.time()
            lag = max(0.0, now - expected)
            self._lags.append(lag)
            metrics.LOOP_LAG.observe(lag)
            if now >= next_check:
                next_check = now + CHECK_INTERVAL_S
                try:
                    if self._sampler is not None:
                        self._measure_busy()
                    self._measure_audio_backlog()
                    self._learn_max_streams(now)
                    self._check_streams()
                    await self._check_models()
                    if self.sampler is not None:
                        self.sampler.sample()
                except Exception:
                    logger.exception("load monitor check failed")

    def _learn_max_streams(self, now: float) -> None:
        """Update the learned stream cap from the projected wait and the open stream count."""
        admission = self._executor.config.admission
        if not admission.learn_max_streams or admission.max_queue_wait_ms <= 0:
            return
        budget_s = admission.max_queue_wait_ms / 1000.0
        wait_s = self.projected_wait_s()
        streams = len(self._service.active_sessions)

        # Overloaded: lower the cap to the most streams carried calmly.
        if wait_s > budget_s:
            self._calm_checks = 0
            self._calm_since = now
            # Without a calm count yet, the cap is what runs now: no more.
            cap = self._calm_streams or max(1, streams)
            if self.learned_max_streams is None or cap < self.learned_max_streams:
                logger.warning(
                    "projected wait %.0f ms with %d streams is over admission.max_queue_wait_ms; "
                    "capping new streams at %d, the most carried within half of it",
                    wait_s * 1000,
                    streams,
                    cap,
                )
                self.learned_max_streams = cap
            # From here on, only counts seen after this overload are calm ones.
            self._calm_streams = 0
            return

        # Busy but within the budget: neither calm nor overloaded.
        if wait_s > budget_s * CALM_FRACTION:
            self._calm_checks = 0
            self._calm_since = now
            return

        # Calm: count the streams carried, and probe above the cap after a calm spell at it.
        self._calm_checks += 1
        if self._calm_checks >= CALM_CHECKS:
            self._calm_streams = max(self._calm_streams, streams)
        cap = self.learned_max_streams
        if cap is not None and streams >= cap and now - self._calm_since >= PROBE_AFTER_S:
            self.learned_max_streams = cap + max(1, round(cap * PROBE_STEP))
            self._calm_since = now
            logger.info("calm at the learned cap of %d streams; raising it to %d", cap, self.learned_max_streams)

    def _check_streams(self) -> None:
        limits = self._limits
        now = time.monotonic()
        for session, context in list(self._service.active_sessions.items()):
            if session.closed:
                continue
            write_started = session.write_started_at
            if write_started is not None and now - write_started > limits.write_timeout_s:
                if session.aborting:
                    continue
                session.aborting = True
                self.ended_by_server("write_timeout")
                logger.warning(
                    "stream %s: the client has not read a response for %.1f s; ending the stream",
                    session.stream_id,
                    now - write_started,
                )
                asyncio.create_task(
                    _abort(
                        context,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the client did not read a response for {limits.write_timeout_s:g} s "
                        "(server limits.write_timeout_s), so the server ended the stream and freed its work; "
                        "read responses as they arrive",
                        limits.write_timeout_s,
                    )
                )
                # The status waits behind the unread messages, and so does the
                # handler's write. Cancelling the handler after the abort has
                # started frees the stream now; the client gets the status once
                # it reads again.
                if session.handler_task is not None:
                    asyncio.get_running_loop().call_soon(session.handler_task.cancel)
            elif limits.max_stream_duration_s and now - session.started_at > limits.max_stream_duration_s:
                if session.end_by_server(pb.STREAM_END_REASON_MAX_DURATION):
                    self.ended_by_server("max_duration")
            elif limits.idle_timeout_s and session.is_idle(now, limits.idle_timeout_s):
                if session.end_by_server(pb.STREAM_END_REASON_IDLE_TIMEOUT):
                    self.ended_by_server("idle_timeout")

    def ended_by_server(self, reason: str) -> None:
        """Count a stream the server ended itself: write_timeout, max_duration, idle_timeout or draining."""
        self.streams_ended[reason] += 1
        metrics.STREAMS_ENDED_BY_SERVER.labels(reason).inc()

    async def _check_models(self) -> None:
        hung = {
            name
            for name, runner in self._executor.runners.items()
            if runner.longest_running_s() > self._limits.model_hang_timeout_s
        }
        if hung == self.unhealthy_models:
            return
        for name in hung - self.unhealthy_models:
            logger.error(
                "model %s: a batch has run for over %.1f s (limits.model_hang_timeout_s); marking the server unhealthy",
                name,
                self._limits.model_hang_timeout_s,
            )
        for name in self.unhealthy_models - hung:
            logger.warning("model %s: the long batch finished; healthy again", name)
        was_healthy = not self.unhealthy_models
        self.unhealthy_models = hung
        if self._on_health_change is not None and was_healthy != (not hung):
            await self._on_health_change(not hung)


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str, timeout_s: float) -> None:
    """Send a status to a call from outside its handler, waiting at most ``timeout_s`` for it to go out."""
    try:
        await asyncio.wait_for(context.abort(code, details), timeout_s)
    except (grpc.aio.AbortError, TimeoutError):
        # abort() raises AbortError in the calling task by design. A client
        # that still reads nothing keeps the status from going out.
        pass
    except Exception as error:
        # The call ended first, for example because the client went away.
        logger.info("the %s status could not be sent: %s", code.name, error)
