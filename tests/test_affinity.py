"""Inference threads pinned to CPUs of their own, every other thread to the rest."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest

from streamutil import audio_requests, run_stream
from streaminfer.server import affinity
from streaminfer.server.config import ConfigError, load_config
from streaminfer.v1 import streaminfer_pb2 as pb

ALLOWED = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="pinning needs two CPUs this process may use")

NOOP_AUDIO = """
[[models]]
name = "noop_audio"
kind = "noop"
modality = "audio"
"""


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", ()), ("1", (1,)), ("0-3, 8", (0, 1, 2, 3, 8)), ("2,2,1", (1, 2)), ([3, 1], (1, 3)), (2, (2,))],
)
def test_cpu_lists_are_read(value, expected) -> None:
    assert load_config(None, {"inference_cpus": value}).inference_cpus == expected


@pytest.mark.parametrize(
    "value", ["a", "3-1", "-1", "1-", "0-,2", "1,,x", " , ", "0-99999999", True, -1, 9000, [1, -2], ["1"]]
)
def test_bad_cpu_list_names_the_field(value) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, {"inference_cpus": value})
    assert f"server.inference_cpus = {value!r} is invalid: expected a string of CPU numbers" in str(error.value)


@needs_two_cpus
def test_last_cpus_follow_this_process() -> None:
    assert load_config(None, {"inference_cpus": "last:1"}).inference_cpus == (ALLOWED[-1],)
    assert load_config(None, {"inference_cpus": f"last:{len(ALLOWED) - 1}"}).inference_cpus == tuple(ALLOWED[1:])


@pytest.mark.parametrize("value", ["last:0", "last:x", "last:", "last:-1"])
def test_bad_last_count_names_the_field(value) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, {"inference_cpus": value})
    assert f"server.inference_cpus = {value!r} is invalid: expected a string of CPU numbers" in str(error.value)


def test_last_cpus_must_leave_one() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, {"inference_cpus": f"last:{len(ALLOWED)}"})
    assert f"takes every CPU this process may use ({','.join(map(str, ALLOWED))}); leave at least one CPU" in str(
        error.value
    )


def test_torch_threads_default_to_one_per_inference_cpu() -> None:
    assert load_config(None, {"inference_cpus": "4-6"}).resolved_torch_threads() == 3
    assert load_config(None, {"inference_cpus": "4-6", "torch_threads": 1}).resolved_torch_threads() == 1


def test_cpu_numbers_are_written_with_ranges() -> None:
    assert affinity.format_cpus((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8"
    assert affinity.format_cpus(frozenset({3})) == "3"


@needs_two_cpus
def test_split_leaves_the_rest_to_the_event_loop() -> None:
    inference, rest = affinity.split_cpus((ALLOWED[-1],))
    assert inference == {ALLOWED[-1]}
    assert rest == set(ALLOWED[:-1])


def test_split_rejects_cpus_the_process_may_not_use() -> None:
    outside = max(ALLOWED, default=0) + 1000
    with pytest.raises(ConfigError) as error:
        affinity.split_cpus((outside,))
    assert f"names CPU(s) {outside} that this process may not use" in str(error.value)


def test_split_rejects_taking_every_cpu() -> None:
    with pytest.raises(ConfigError) as error:
        affinity.split_cpus(tuple(ALLOWED))
    assert "leave at least one CPU for the event loop, or leave inference_cpus empty" in str(error.value)


def allowed_cpus_of_threads(pid: int) -> dict[int, str]:
    found = {}
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        found[int(task.name)] = re.search(r"^Cpus_allowed_list:\s*(\S+)", status, re.M).group(1)
    return found


@needs_two_cpus
def test_server_pins_inference_threads_apart(tmp_path) -> None:
    config = tmp_path / "server.toml"
    config.write_text(NOOP_AUDIO)
    inference_cpu = ALLOWED[-1]
    rest = affinity.format_cpus(frozenset(ALLOWED[:-1]))
    server = subprocess.Popen(
        [
            sys.executable, "-m", "streaminfer.server.cli", "serve", "--config", str(config),
            "--port", "0", "--metrics-port", "-1", "--inference-cpus", str(inference_cpu),
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        log = []
        for line in server.stdout:
            log.append(line)
            if line.startswith("streaminfer listening on"):
                break
        port = re.search(r"listening on \S+:(\d+)", log[-1]).group(1)
        expected = f"inference threads pinned to CPU(s) {inference_cpu}; every other thread to CPU(s) {rest}"
        assert any(expected in line for line in log), log
        tone = (np.sin(np.arange(16_000) / 8.0) * 8000).astype("<i2")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            outcome = run_stream(
                channel,
                pb.StreamConfig(
                    models=[pb.ModelSelection(model="noop_audio")],
                    audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=16_000),
                ),
                audio_requests(tone, 16_000),
            )
        assert outcome.errors == []
        assert len(outcome.acked[pb.MODALITY_AUDIO]) == len(audio_requests(tone, 16_000))

        threads = allowed_cpus_of_threads(server.pid)
        assert threads[server.pid] == rest
        # One inference thread for the model's one instance, and one intra-op thread at most.
        pinned = [tid for tid, cpus in threads.items() if cpus == str(inference_cpu)]
        assert 1 <= len(pinned) <= 2, threads
        assert all(cpus in (rest, str(inference_cpu)) for cpus in threads.values()), threads
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_server_rejects_cpus_it_may_not_use(workers) -> None:
    outside = max(ALLOWED, default=0) + 1000
    result = subprocess.run(
        [sys.executable, "-m", "streaminfer.server.cli", "serve", "--port", "0", "--metrics-port", "-1",
         "--workers", workers, "--inference-cpus", str(outside)],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    # One line from the command itself, before any worker starts.
    assert result.stderr.splitlines() == [
        f"streaminfer: server.inference_cpus = '{outside}' names CPU(s) {outside} that this process may not use; "
        f"it may use CPUs {affinity.format_cpus(frozenset(ALLOWED))}"
    ]
