"""gRPC's I/O threads run below the event loop's priority."""

from __future__ import annotations

import os
import pathlib
import signal
import threading

import grpc
import pytest

from streaminfer.server import priority
from streaminfer.server.config import ConfigError, ServerConfig, load_config
from streamutil import start_cli_server
from test_affinity import NOOP_AUDIO, noop_audio_stream

pytestmark = pytest.mark.skipif(not priority.supported(), reason="thread priorities need Linux with /proc")


class IdleThread:
    """A thread of this process that waits until closed, so that tests may change its nice value alone."""

    def __init__(self, name: str = "idle-for-test") -> None:
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._stop.wait, name=name, daemon=True)
        self.thread.start()
        self.thread_id = self.thread.native_id

    def close(self) -> None:
        self._stop.set()
        self.thread.join()


@pytest.fixture(autouse=True)
def no_real_poller(monkeypatch):
    """Hide the poller threads of gRPC servers that other tests started in this process, so tests lower only their own threads."""
    monkeypatch.setattr(priority, "python_threads", lambda: [])


@pytest.fixture
def idle_thread():
    thread = IdleThread()
    yield thread
    thread.close()


def test_poller_found_by_python_name(monkeypatch, tmp_path) -> None:
    poller = IdleThread("Thread-7 (_poll_wrapper)")
    try:
        monkeypatch.setattr(priority, "python_threads", lambda: [poller.thread])
        assert priority.grpc_thread_ids(fake_tasks(tmp_path, {})) == {poller.thread_id}
    finally:
        poller.close()


def fake_tasks(root: pathlib.Path, names: dict[int, str]) -> pathlib.Path:
    """Write a /proc/self/task look-alike: one folder per thread id with its comm file."""
    for thread_id, name in names.items():
        (root / str(thread_id)).mkdir()
        (root / str(thread_id) / "comm").write_text(name + "\n")
    return root


def test_grpc_threads_found_by_name(tmp_path) -> None:
    tasks = fake_tasks(tmp_path, {101: "event_engine", 102: "python", 103: "lifeguard", 104: "grpc_global_tim"})
    found = priority.grpc_thread_ids(tasks)
    assert {101, 103, 104} <= found
    assert 102 not in found


def test_lower_sets_nice_once(tmp_path, idle_thread) -> None:
    tasks = fake_tasks(tmp_path, {idle_thread.thread_id: "event_engine"})
    base = os.getpriority(os.PRIO_PROCESS, 0)
    lowering = priority.GrpcThreadPriority(3, tasks)

    assert lowering.lower() == 1
    assert lowering.target == min(19, base + 3)
    assert priority.thread_nice(idle_thread.thread_id) == min(19, base + 3)
    assert priority.thread_nice(threading.get_native_id()) == base
    # Known threads are not looked at again.
    assert lowering.lower() == 0


def test_ended_threads_are_forgotten(tmp_path, idle_thread) -> None:
    tasks = fake_tasks(tmp_path, {idle_thread.thread_id: "event_engine"})
    lowering = priority.GrpcThreadPriority(2, tasks)
    gone = 4_194_304 + 17  # past Linux's largest thread id, so no thread has it
    lowering.lowered.add(gone)

    assert lowering.lower() == 1
    assert gone not in lowering.lowered
    assert idle_thread.thread_id in lowering.lowered


def test_nice_value_capped_at_19(tmp_path, idle_thread) -> None:
    tasks = fake_tasks(tmp_path, {idle_thread.thread_id: "event_engine"})
    lowering = priority.GrpcThreadPriority(40, tasks)
    assert lowering.lower() == 1
    assert priority.thread_nice(idle_thread.thread_id) == 19


def test_ended_thread_is_skipped(tmp_path, idle_thread) -> None:
    ended = threading.Thread(target=lambda: None)
    ended.start()
    ended.join()
    tasks = fake_tasks(tmp_path, {ended.native_id: "event_engine", idle_thread.thread_id: "event_engine"})
    lowering = priority.GrpcThreadPriority(2, tasks)
    # The ended thread's id may have been given to a new thread. Either way the live one is lowered.
    assert lowering.lower() in (1, 2)
    assert idle_thread.thread_id in lowering.lowered
    assert not lowering.failed


def test_zero_leaves_every_thread(tmp_path, idle_thread) -> None:
    tasks = fake_tasks(tmp_path, {idle_thread.thread_id: "event_engine"})
    before = priority.thread_nice(idle_thread.thread_id)
    lowering = priority.GrpcThreadPriority(0, tasks)
    assert not lowering.active
    assert lowering.lower() == 0
    assert priority.thread_nice(idle_thread.thread_id) == before


def test_unreadable_task_list_disables(tmp_path, caplog) -> None:
    lowering = priority.GrpcThreadPriority(5, tmp_path / "missing")
    assert lowering.lower() == 0
    assert lowering.failed and not lowering.active
    assert "Set server.grpc_thread_nice = 0 to skip this step" in caplog.text


def test_config_default_and_bounds(tmp_path) -> None:
    assert load_config(None).grpc_thread_nice == ServerConfig().grpc_thread_nice == 10
    assert load_config(None, {"grpc_thread_nice": 0}).grpc_thread_nice == 0
    assert load_config(None, {"grpc_thread_nice": 19}).grpc_thread_nice == 19
    for value in (-1, 20, 2.5, True, "5"):
        with pytest.raises(ConfigError, match=r"server\.grpc_thread_nice = .* is invalid: expected a whole number of nice levels from 0"):
            load_config(None, {"grpc_thread_nice": value})


def nice_of_threads(pid: int) -> dict[int, tuple[str, int]]:
    """Return each thread's name and nice value, read from /proc."""
    found = {}
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        found[int(task.name)] = (stat[stat.index("(") + 1 : stat.rindex(")")], int(fields[16]))
    return found


@pytest.mark.parametrize(("flag", "expected"), [([], 10), (["--grpc-thread-nice", "0"], 0), (["--grpc-thread-nice", "4"], 4)])
def test_server_lowers_grpc_threads(tmp_path, flag, expected) -> None:
    config = tmp_path / "server.toml"
    config.write_text(NOOP_AUDIO)
    server, port, log = start_cli_server(["--config", str(config), "--metrics-port", "-1", *flag])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert noop_audio_stream(channel) > 0

        base = os.getpriority(os.PRIO_PROCESS, 0)
        threads = nice_of_threads(server.pid)
        assert threads[server.pid][1] == base
        engine = [nice for name, nice in threads.values() if name == "event_engine"]
        assert engine and all(nice == min(19, base + expected) for nice in engine), threads
        # Every thread that is not gRPC's keeps the loop's priority.
        others = [nice for name, nice in threads.values() if name not in priority.GRPC_THREAD_NAMES]
        assert sum(nice != base for nice in others) <= 1, threads  # the poller thread, named "python"
        announced = [line for line in log if "I/O thread(s) run at nice" in line]
        assert bool(announced) == (expected > 0), log
        if expected > 0:
            assert f"run at nice {base + expected}, {expected} below the event loop's {base}" in announced[0]
        else:
            assert any("gRPC's threads keep the event loop's priority (server.grpc_thread_nice = 0)" in line for line in log)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()


def test_loop_at_nice_19_disables(tmp_path, idle_thread, caplog, monkeypatch) -> None:
    tasks = fake_tasks(tmp_path, {idle_thread.thread_id: "event_engine"})
    before = priority.thread_nice(idle_thread.thread_id)
    lowering = priority.GrpcThreadPriority(10, tasks)
    monkeypatch.setattr(os, "getpriority", lambda which, who: 19)
    assert lowering.lower() == 0
    monkeypatch.undo()

    assert lowering.failed
    assert "the event loop already runs at nice 19" in caplog.text
    assert priority.thread_nice(idle_thread.thread_id) == before
