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

from streamutil import audio_requests, run_stream, start_cli_server
from streaminfer.server import affinity
from streaminfer.server.config import ConfigError, load_config
from streaminfer.server.workers import worker_config
from streaminfer.v1 import streaminfer_pb2 as pb

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="thread CPU affinity is Linux only")

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
    [("", ()), ("1", (1,)), ("0-3, 8", (0, 1, 2, 3, 8)), (" 0 - 1 ,3", (0, 1, 3)), ("2,2,1", (1, 2)), ([3, 1], (1, 3)), (2, (2,))],
)
def test_cpu_lists_are_read(value, expected) -> None:
    assert load_config(None, {"inference_cpus": value}).inference_cpus == expected


@pytest.mark.parametrize(
    "value",
    ["a", "3-1", "-1", "1-", "0-,2", "1,,x", "1,", " , ", "0 1", "\u00b2", "0-99999999", True, -1, 9000, [1, -2], ["1"]],
)
def test_bad_cpu_list_names_the_field(value) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, {"inference_cpus": value})
    assert f"server.inference_cpus = {value!r} is invalid: expected a string of CPU numbers" in str(error.value)


@needs_two_cpus
def test_last_cpus_follow_this_process() -> None:
    assert load_config(None, {"inference_cpus": "last:1"}).inference_cpus == (ALLOWED[-1],)
    assert load_config(None, {"inference_cpus": f"last:{len(ALLOWED) - 1}"}).inference_cpus == tuple(ALLOWED[1:])


@pytest.mark.parametrize("value", ["last:0", "last:x", "last:", "last:-1", "last:\u00b2"])
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


def test_workers_divide_the_pinned_cpus() -> None:
    config = load_config(None, {"inference_cpus": "2-5"})
    assert worker_config(config, 2).torch_threads == 2
    assert worker_config(config, 8).torch_threads == 1


@needs_two_cpus
@pytest.mark.parametrize("variable", affinity.OPENMP_BINDING_VARIABLES)
def test_openmp_binding_is_rejected(monkeypatch, variable) -> None:
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ConfigError) as error:
        affinity.split_cpus((ALLOWED[-1],))
    assert f"cannot work with {variable} set: OpenMP then places torch's threads on CPUs itself" in str(error.value)


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


MINILM = """
[[models]]
name = "minilm_embedding"
kind = "minilm_embedding"
"""


def noop_audio_stream(channel: grpc.Channel) -> int:
    """Stream a second of tone to the no-op audio model; return the chunks acked."""
    tone = (np.sin(np.arange(16_000) / 8.0) * 8000).astype("<i2")
    requests = audio_requests(tone, 16_000)
    config = pb.StreamConfig(
        models=[pb.ModelSelection(model="noop_audio")],
        audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=16_000),
    )
    outcome = run_stream(channel, config, requests)
    assert outcome.errors == []
    assert len(outcome.acked[pb.MODALITY_AUDIO]) == len(requests)
    return len(requests)


def embedding_stream(channel: grpc.Channel) -> int:
    """Stream two sentences to MiniLM; return the chunks acked."""
    requests = [
        pb.StreamRequest(text=pb.TextChunk(sequence_number=index, text=text.encode()))
        for index, text in enumerate(["The pump runs at night. ", "Its noise wakes the neighbours. "])
    ]
    config = pb.StreamConfig(models=[pb.ModelSelection(model="minilm_embedding")])
    outcome = run_stream(channel, config, requests)
    assert outcome.errors == []
    assert len(outcome.acked[pb.MODALITY_TEXT]) == len(requests)
    return len(requests)


@needs_two_cpus
@pytest.mark.parametrize(
    ("models", "torch_threads", "stream", "fewest_pinned", "most_pinned"),
    [
        # The inference thread alone: one torch thread, and the no-op model starts none.
        (NOOP_AUDIO, "0", noop_audio_stream, 1, 1),
        # The inference thread and the threads started from it: torch's
        # intra-op thread and any the model's libraries start.
        (MINILM, "2", embedding_stream, 2, None),
    ],
)
def test_server_pins_inference_threads_apart(
    tmp_path, models, torch_threads, stream, fewest_pinned, most_pinned
) -> None:
    config = tmp_path / "server.toml"
    config.write_text(models)
    inference_cpu = ALLOWED[-1]
    rest = affinity.format_cpus(frozenset(ALLOWED[:-1]))
    server, port, log = start_cli_server(
        ["--config", str(config), "--metrics-port", "-1", "--inference-cpus", str(inference_cpu), "--torch-threads", torch_threads]
    )
    try:
        expected = f"inference threads pinned to CPU(s) {inference_cpu}; every other thread to CPU(s) {rest}"
        assert any(expected in line for line in log), log
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert stream(channel) > 0

        threads = allowed_cpus_of_threads(server.pid)
        assert threads[server.pid] == rest
        pinned = [tid for tid, cpus in threads.items() if cpus == str(inference_cpu)]
        assert len(pinned) >= fewest_pinned, threads
        if most_pinned is not None:
            assert len(pinned) <= most_pinned, threads
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
