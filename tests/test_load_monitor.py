"""The load monitor: hung model detection and the projected queue wait."""

from __future__ import annotations

import asyncio
import threading
import time
import types
from collections.abc import Callable

import pytest

from test_batcher import Owner, RecordingModel

from streaminfer.server.batcher import ModelRunner, WorkItem
from streaminfer.server.config import BatchingConfig, LimitsConfig, ModelConfig, ServerConfig
from streaminfer.server.decode import DecodeStage
from streaminfer.server import load as load_module
from streaminfer.server.load import LoadMonitor
from streaminfer.server.models.base import ModelInput, StreamOptions
from streaminfer.v1 import streaminfer_pb2 as pb


def test_hung_batch_marks_model_unhealthy() -> None:
    async def scenario() -> list[bool]:
        loop = asyncio.get_running_loop()
        model = RecordingModel(stateful=False, delay_s=1.2)
        model_config = ModelConfig(name="slow", kind="noop", batching=BatchingConfig(max_batch_size=1, max_queue_delay_ms=0))
        runner = ModelRunner(model, model_config, "cpu", lambda items: None, loop)
        runner.start()
        config = ServerConfig(models=(model_config,), limits=LimitsConfig(model_hang_timeout_s=0.3))
        executor = types.SimpleNamespace(config=config, runners={"slow": runner}, decode=DecodeStage(1))
        service = types.SimpleNamespace(active_sessions={}, rejected={})
        changes: list[bool] = []

        async def record(healthy: bool) -> None:
            changes.append(healthy)

        monitor = LoadMonitor(executor, service, record)  # type: ignore[arg-type]
        monitor.start()
        owner = Owner(StreamOptions(stream_id="a", interim_results=False))
        runner.submit([WorkItem(owner, None, ModelInput("x", 0, 0, 0), 0, None, None)])
        deadline = time.monotonic() + 10
        while len(changes) < 2 and time.monotonic() < deadline:
            if changes == [False]:
                assert monitor.unhealthy_models == {"slow"}
            await asyncio.sleep(0.05)
        await monitor.aclose()
        await asyncio.to_thread(runner.stop)
        return changes

    changes = asyncio.run(scenario())
    # Unhealthy while the 1.2 s batch ran past the 0.3 s hang timeout, healthy after.
    assert changes == [False, True]


def test_projected_wait_counts_queued_batches() -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        model = RecordingModel(stateful=False, delay_s=0.0)
        model_config = ModelConfig(name="m", kind="noop", batching=BatchingConfig(max_batch_size=4))
        runner = ModelRunner(model, model_config, "cpu", lambda items: None, loop)
        # Not started: the queue only fills. 10 items make 3 batches of at most 4.
        runner.batch_seconds = 0.05
        owner = Owner(StreamOptions(stream_id="a", interim_results=False))
        runner.submit([WorkItem(owner, None, ModelInput(i, 0, 0, 0), i, None, None) for i in range(10)])
        config = ServerConfig(models=(model_config,))
        executor = types.SimpleNamespace(config=config, runners={"m": runner}, decode=DecodeStage(1))
        monitor = LoadMonitor(executor, types.SimpleNamespace(active_sessions={}))  # type: ignore[arg-type]
        return monitor.projected_wait_s()

    assert abs(asyncio.run(scenario()) - 0.15) < 1e-9


def test_audio_backlog_follows_client_pace(server) -> None:
    from streamutil import vad_config

    from streaminfer.server.session import Session

    async def scenario() -> list[float | None]:
        session = Session(server.server.executor, vad_config(sample_rate=16_000))
        chunk = 512 * 2  # 32 ms of 16 kHz PCM16
        backlogs = []
        # Ten chunks read on the client's real-time pace: no backlog.
        for index in range(10):
            session._track_audio_pace(chunk, 100.0 + index * 0.032)
        backlogs.append(session.audio_backlog_s(100.0 + 9 * 0.032))
        # The next ten read 50 ms apart: each one 18 ms later than the pace.
        for index in range(10):
            session._track_audio_pace(chunk, 100.0 + 9 * 0.032 + (index + 1) * 0.050)
        backlogs.append(session.audio_backlog_s(100.0 + 9 * 0.032 + 10 * 0.050))
        # Not read because the stream's window is full: the client is behind, not the server.
        session._waiting_for_window = True
        backlogs.append(session.audio_backlog_s(100.0 + 9 * 0.032 + 10 * 0.050))
        session._waiting_for_window = False
        # Nothing read for over a second: a paused client, not a late server.
        backlogs.append(session.audio_backlog_s(100.0 + 9 * 0.032 + 10 * 0.050 + 1.5))
        # Not read because the server is ending the stream (its maximum duration passed).
        session.end_reason = pb.STREAM_END_REASON_MAX_DURATION
        backlogs.append(session.audio_backlog_s(100.0 + 9 * 0.032 + 10 * 0.050 + 0.4))
        session.close()
        return backlogs

    on_pace, behind, window_full, paused, ending = asyncio.run(scenario())
    assert on_pace is not None and abs(on_pace) < 1e-9
    assert behind is not None and abs(behind - 10 * 0.018) < 1e-6
    assert window_full is None
    assert paused is None
    assert ending is None


def test_stream_cap_learned_from_overload() -> None:
    from streaminfer.server.config import AdmissionConfig

    config = ServerConfig(
        models=(ModelConfig(name="m", kind="noop"),),
        admission=AdmissionConfig(max_queue_wait_ms=100, learn_max_streams=True),
    )
    service = types.SimpleNamespace(active_sessions={})
    executor = types.SimpleNamespace(config=config, runners={}, decode=DecodeStage(1))
    monitor = LoadMonitor(executor, service)  # type: ignore[arg-type]
    wait = {"s": 0.0}
    monitor.projected_wait_s = lambda: wait["s"]  # type: ignore[method-assign]
    clock = {"now": 0.0}

    def checks(streams: int, wait_s: float, count: int) -> None:
        service.active_sessions = {object(): None for _ in range(streams)}
        wait["s"] = wait_s
        for _ in range(count):
            clock["now"] += 0.25
            monitor._learn_max_streams(clock["now"])

    checks(50, 0.01, 4)
    assert monitor.learned_max_streams is None  # no overload yet, so no cap
    checks(80, 0.01, 4)
    checks(90, 0.06, 4)  # over half the budget: not calm, not counted
    checks(100, 0.2, 3)  # overloaded for three checks in a row
    assert monitor.learned_max_streams == 80
    checks(80, 0.01, 39)  # calm at the cap for 9.75 s
    assert monitor.learned_max_streams == 80
    checks(80, 0.01, 1)  # 10 s
    assert monitor.learned_max_streams == 84
    checks(84, 0.3, 1)  # overloaded again at 84: the cap falls to the calm count since
    assert monitor.learned_max_streams == 80


def samples(busy: int, total: int = 50) -> tuple[int, int]:
    """One check's loop samples: ``total`` of them, ``busy`` of which found the loop busy."""
    return total, busy


def grown(load: float, learned_at: float, fraction: float, idle: float = 0.0) -> float:
    """Return the busy fraction that ``load`` (streams times their cost learned at ``learned_at``) makes at ``fraction``."""
    return idle + load * (1 + load_module.COST_GROWTH * (fraction - learned_at))


def test_busy_fraction_projects_cost_per_stream() -> None:
    from streaminfer.server.load import BusyMeter

    meter = BusyMeter(0.8)
    # No samples yet and no cost known: the cold-start limit applies.
    cold = meter.project(0)
    assert cold.measured == 0.0
    assert cold.cold_start_limit == 64
    assert meter.capacity() is None
    for _ in range(8):
        meter.add_check(*samples(0), streams=0.0, changed_streams=0)
    assert meter.idle_fraction == 0.0
    # A steady second at 100 streams with the loop busy 40 % of it: 0.004 per stream.
    meter = BusyMeter(0.8)
    for _ in range(4):
        meter.add_check(*samples(20), streams=100.0, changed_streams=0)
    assert meter.fraction() == 0.4
    assert meter.steady_cost is not None and abs(meter.steady_cost - 0.004) < 1e-12
    assert meter.steady_fraction == 0.4
    # At the fraction it was learned at, the cost prices streams in proportion: 100 streams, 0.4.
    assert abs(meter.project(99).projected - 0.4) < 1e-12
    # At 0.8 a stream costs 0.0048: 166 streams fit.
    assert meter.capacity() == 166
    assert meter.project(165).projected < 0.8 < meter.project(166).projected
    # 151 streams would be 0.604 in proportion; busier, each costs more.
    projection = meter.project(150)
    assert abs(projection.projected - grown(0.604, 0.4, projection.projected)) < 1e-9
    assert 0.69 < projection.projected < 0.70
    assert projection.cold_start_limit is None
    assert projection.measured == 0.4
    assert projection.streams == 100.0
    # The projection never falls under what is measured.
    projection = meter.project(10)
    assert projection is not None and projection.projected == 0.4


def test_busy_projection_over_full_loop() -> None:
    from streaminfer.server.load import BusyMeter

    meter = BusyMeter(0.8)
    for _ in range(4):
        meter.add_check(*samples(20), streams=100.0, changed_streams=0)
    # 1,000 streams at 0.004 each: no busy fraction up to 1 carries them, so
    # they are priced at the cost they would have at 1, which projects over 1.
    projection = meter.project(999)
    assert abs(projection.projected - grown(4.0, 0.4, 1.0)) < 1e-9
    # Up to where the load could still be carried, the projection rises with the streams.
    fractions = [meter.project(streams).projected for streams in range(100, 1000, 50)]
    assert fractions == sorted(fractions)


def test_busy_burst_of_new_streams_keeps_steady_cost() -> None:
    from streaminfer.server.load import BusyMeter

    meter = BusyMeter(0.8)
    for _ in range(4):
        meter.add_check(*samples(20), streams=100.0, changed_streams=0)
    steady = meter.steady_cost
    # 80 streams opened within the second: setting them up costs more than
    # carrying them, so the steady cost stays and the 180 open streams count at it.
    for _ in range(4):
        meter.add_check(*samples(30), streams=120.0, changed_streams=20)
    assert meter.steady_cost == steady
    projection = meter.project(180)
    assert abs(projection.projected - grown(0.724, 0.4, projection.projected)) < 1e-9


def test_busy_projection_keeps_room_for_arrivals() -> None:
    from streaminfer.server.load import ARRIVAL_COST_S, ARRIVAL_RESERVE_MAX, BusyMeter

    meter = BusyMeter(0.8)
    for _ in range(8):
        meter.add_check(*samples(20), streams=100.0, changed_streams=0)
    still = meter.project(120).projected
    assert meter.project(120).reserve == 0.0
    # 10 streams arrive each quarter second: 40 a second, each keeping ARRIVAL_COST_S free.
    for _ in range(4):
        meter.add_check(*samples(20), streams=100.0, changed_streams=10, arrivals=10)
    projection = meter.project(120)
    assert projection.arrivals_per_s == 40.0
    assert abs(projection.reserve - 40 * ARRIVAL_COST_S) < 1e-12
    assert projection.reserve < ARRIVAL_RESERVE_MAX
    assert abs(projection.projected - (still + projection.reserve)) < 1e-12
    # 300 a second would keep 0.24 free; the reserve stops at ARRIVAL_RESERVE_MAX.
    for _ in range(4):
        meter.add_check(*samples(20), streams=100.0, changed_streams=75, arrivals=75)
    assert meter.project(120).reserve == ARRIVAL_RESERVE_MAX
    # The capacity is the count with nothing arriving.
    assert meter.capacity() == 166


def test_busy_cost_not_learned_when_saturated() -> None:
    from streaminfer.server.load import BusyMeter

    meter = BusyMeter(0.8)
    for _ in range(4):
        meter.add_check(*samples(20), streams=100.0, changed_streams=0)
    # 150 streams more, then saturated: 49 of 50 samples busy with 250 streams
    # would price a stream at 0.00392, under the 0.004 learned.
    meter.add_check(*samples(49), streams=250.0, changed_streams=150)
    for _ in range(8):
        meter.add_check(*samples(49), streams=250.0, changed_streams=0)
    assert meter.steady_cost is not None
    assert abs(meter.steady_cost - 0.004) < 1e-12


def test_busy_cost_learned_over_limit() -> None:
    from streaminfer.server.load import BusyMeter

    meter = BusyMeter(0.8)
    for _ in range(8):
        meter.add_check(*samples(20), streams=100.0, changed_streams=0)
    assert meter.steady_cost is not None
    assert abs(meter.steady_cost - 0.004) < 1e-12
    # A burst let in 200 streams and the loop is busy 0.9 of the time, over the
    # limit but short of saturation: the price rises toward 0.0045, most of
    # the way in 5 s (20 checks), and all of it later.
    for _ in range(20):
        meter.add_check(*samples(45), streams=200.0, changed_streams=0)
    assert 0.0042 < meter.steady_cost < 0.0045
    for _ in range(400):
        meter.add_check(*samples(45), streams=200.0, changed_streams=0)
    assert abs(meter.steady_cost - 0.0045) < 1e-6
    assert abs(meter.steady_fraction - 0.9) < 1e-6
    # Meanwhile the measured fraction itself keeps new streams out.
    assert meter.project(170).projected == 0.9
    # Once those streams end, the cost learned at 0.9 is lowered for a quieter
    # loop: 187 streams fit under the limit of 0.8, where 177 would at 0.0045 each.
    meter.add_check(*samples(0), streams=0.0, changed_streams=200)
    for _ in range(8):
        meter.add_check(*samples(0), streams=0.0, changed_streams=0)
    assert meter.project(186).projected < 0.8 < meter.project(187).projected
    # The capacity reported is that count: 187 open, then the next is rejected.
    assert meter.capacity() == 187


def test_busy_cost_before_steady_second() -> None:
    from streaminfer.server.load import BusyMeter

    meter = BusyMeter(0.8)
    # Streams opening from the start: the cost over the last second is used, 0.3 over 50 streams.
    for _ in range(4):
        meter.add_check(*samples(15), streams=50.0, changed_streams=25)
    assert meter.steady_cost is None
    projection = meter.project(120)
    assert abs(projection.projected - grown(0.726, 0.3, projection.projected)) < 1e-9
    # Fewer than 8 streams on average: too few to price one, so only the measure counts.
    small = BusyMeter(0.8)
    for _ in range(4):
        small.add_check(*samples(5), streams=4.0, changed_streams=1)
    projection = small.project(60)
    assert projection.projected == 0.1
    assert projection.cold_start_limit == 64
    # Twice the streams open over the last second once that is more than 64.
    busy_start = BusyMeter(0.8)
    for _ in range(4):
        busy_start.add_check(*samples(0), streams=50.0, changed_streams=50)
    assert busy_start.project(60).cold_start_limit is None  # 50 streams and an idle loop: a cost of 0 is known


SAMPLING_UNAVAILABLE = load_module.loop_sampling_unavailable()
needs_sampling = pytest.mark.skipif(SAMPLING_UNAVAILABLE is not None, reason=str(SAMPLING_UNAVAILABLE))


def sample_thread(work: Callable[[], object]) -> tuple[float, float]:
    """Return the busy share the sampler reads of a thread blocked in epoll, then of the same thread running ``work``."""
    import selectors
    import socket

    from streaminfer.server.load import LoopSampler, open_thread_syscall

    working = threading.Event()
    # Set once the thread has left epoll for its work, so that samples of the switch are left out.
    at_work = threading.Event()
    stop = threading.Event()
    descriptors: list[int] = []

    def loop() -> None:
        descriptors.append(open_thread_syscall())
        reader, writer = socket.socketpair()
        with reader, writer, selectors.EpollSelector() as selector:
            selector.register(reader, selectors.EVENT_READ)
            while not stop.is_set():
                if working.is_set():
                    at_work.set()
                    work()
                else:
                    selector.select(0.05)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        while not descriptors:
            time.sleep(0.01)
        sampler = LoopSampler(descriptors[0])
        sampler.start()
        try:
            time.sleep(0.5)
            idle_samples, idle_busy = sampler.take()
            working.set()
            assert at_work.wait(5)
            sampler.take()
            time.sleep(0.5)
            work_samples, work_busy = sampler.take()
        finally:
            sampler.stop()
    finally:
        stop.set()
        thread.join()
    assert idle_samples >= 20
    assert work_samples >= 20
    return idle_busy / idle_samples, work_busy / work_samples


@needs_sampling
def test_loop_sampler_epoll_idle_work_busy() -> None:
    import hashlib

    block = bytes(1 << 20)
    # hashlib releases the GIL for large inputs, so the sampler runs meanwhile.
    idle, busy = sample_thread(lambda: hashlib.sha256(block).digest())
    assert idle < 0.2
    assert busy > 0.8


@needs_sampling
def test_loop_sampler_reads_python_work_as_busy() -> None:
    def spin() -> None:
        # Pure Python for 20 ms at a time: the sampler gets the GIL only at the switch interval, and then the loop
        # thread waits for it, which counts as busy.
        end = time.perf_counter() + 0.02
        while time.perf_counter() < end:
            pass

    idle, busy = sample_thread(spin)
    assert idle < 0.2
    assert busy > 0.8


@needs_sampling
def test_loop_sampler_stops_when_the_thread_ends() -> None:
    from streaminfer.server.load import LoopSampler, open_thread_syscall

    descriptors: list[int] = []
    thread = threading.Thread(target=lambda: descriptors.append(open_thread_syscall()))
    thread.start()
    thread.join()
    sampler = LoopSampler(descriptors[0])
    sampler.start()
    deadline = time.monotonic() + 5.0
    while sampler.failure is None and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.stop()
    assert sampler.failure is not None
    assert sampler.failure.startswith("reading the event loop's /proc system call file failed")


def test_loop_sampling_unavailable_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    from streaminfer.server import load

    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    with pytest.raises(load.LoopSamplingUnavailable) as unknown:
        load.open_thread_syscall()
    assert str(unknown.value) == "the epoll system call numbers of machine 'riscv64' are not known (known: x86_64, aarch64)"
    monkeypatch.setattr(load.sys, "platform", "darwin")
    with pytest.raises(load.LoopSamplingUnavailable) as other_system:
        load.open_thread_syscall()
    assert str(other_system.value) == "the event loop is sampled from Linux /proc, and this is darwin"


@needs_sampling
def test_loop_sampling_checks_the_epoll_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    from streaminfer.server import load

    # The numbers of another architecture: an epoll wait here reads as none of them.
    machine = load.platform.machine()
    monkeypatch.setitem(load.LOOP_WAIT_SYSCALLS, machine, frozenset({9999}))
    with pytest.raises(load.LoopSamplingUnavailable) as wrong:
        load.open_thread_syscall()
    assert "a thread blocked in epoll reads as system call" in str(wrong.value)
    assert "not one of [9999]" in str(wrong.value)


@needs_sampling
def test_busy_check_off_when_sampler_fails() -> None:
    from streaminfer.server.config import AdmissionConfig

    async def scenario() -> None:
        config = ServerConfig(models=(), admission=AdmissionConfig(max_busy_fraction=0.85))
        executor = types.SimpleNamespace(config=config, runners={}, decode=DecodeStage(1))
        monitor = LoadMonitor(executor, types.SimpleNamespace(active_sessions={}, rejected={}))  # type: ignore[arg-type]
        monitor.start()
        try:
            assert monitor.busy_limit == 0.85
            assert monitor.busy_projection() is not None
            monitor._sampler.failure = "reading failed"  # type: ignore[union-attr]
            monitor._measure_busy()
            assert monitor.busy_limit == 0.0
            assert monitor.busy_projection() is None
            assert monitor.busy_fraction() is None
        finally:
            await monitor.aclose()

    asyncio.run(scenario())


@needs_sampling
def test_busy_capacity_from_real_streams(server) -> None:
    """Twelve real-time VAD streams over loopback teach the server a cost per stream, which /metrics reports as a capacity."""
    import re
    import urllib.request

    import grpc.aio
    import numpy as np
    from streamutil import vad_config

    from streaminfer.v1 import streaminfer_pb2 as pb
    from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

    streams, chunks, chunk_s = 12, 100, 0.032
    tone = (np.sin(np.arange(512) * 0.05) * 8000).astype("<i2").tobytes()
    readings: list[tuple[int | None, float]] = []

    async def one_stream(stub: pb_grpc.InferenceServiceStub) -> None:
        call = stub.Stream()
        await call.write(pb.StreamRequest(config=vad_config(sample_rate=16_000)))
        assert (await call.read()).HasField("session_accepted")
        started = time.monotonic()
        for index in range(chunks):
            await asyncio.sleep(max(0.0, started + index * chunk_s - time.monotonic()))
            await call.write(pb.StreamRequest(audio=pb.AudioChunk(sequence_number=index, audio_content=tone)))
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            tasks = [asyncio.create_task(one_stream(stub)) for _ in range(streams)]
            # Read while all twelve are open: after 2.5 s, of which at least a second was steady.
            await asyncio.sleep(2.5)
            monitor = server.server.monitor
            readings.append((monitor.busy_capacity(), monitor.busy.steady_fraction))
            await asyncio.gather(*tasks)

    asyncio.run(scenario())
    [(capacity, learned_at)] = readings
    assert capacity is not None
    assert capacity > 0
    assert 0.0 < learned_at < 1.0
    # The gauge is sampled once a second, so it has the value by now.
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as response:
        page = response.read().decode()
    match = re.search(r"(?m)^streaminfer_busy_capacity_streams (\S+)$", page)
    assert match is not None
    assert float(match.group(1)) > 0
