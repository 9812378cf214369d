"""Streams free their state when they end or are cancelled; workers start and stop cleanly."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np

from conftest import MEDIA
from streamutil import audio_requests, read_wav, run_stream, vad_config
from streaminfer.server import metrics
from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_cancelled_stream_frees_its_state(channel, server) -> None:
    service = server.server.service
    runner = server.server.executor.runners["silero_vad"]
    samples, rate = read_wav(MEDIA / "audio" / "speech_sample.wav")
    requests = audio_requests(samples, rate)

    def messages():
        yield pb.StreamRequest(config=vad_config(rate))
        yield from requests[:100]
        time.sleep(30)  # the call is cancelled long before this ends

    call = pb_grpc.InferenceServiceStub(channel).Stream(messages(), timeout=60)
    first = next(call)
    assert first.HasField("session_accepted")
    assert wait_until(lambda: len(service.active_sessions) == 1)
    session = next(iter(service.active_sessions))
    call.cancel()

    assert wait_until(lambda: not service.active_sessions), "the cancelled stream is still active"
    assert session.closed
    assert all(slot.inference_state is None for ledger in session._ledgers.values() for slot in ledger.slots)
    assert wait_until(lambda: runner.queue_depth == 0)

    # The batcher goes on serving the next stream.
    outcome = run_stream(channel, vad_config(rate), requests)
    assert outcome.errors == []
    assert len(outcome.speech_segments()) == 8


def test_two_workers_serve_and_stop_on_sigterm() -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "streaminfer.server.cli", "--log-level", "WARNING", "serve", "--workers", "2", "--port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+) \(2 workers\)", line)
        assert match, f"unexpected first line: {line!r}"
        target = f"127.0.0.1:{match.group(1)}"

        # Several channels, so that the kernel can hand connections to both workers.
        outcomes = []
        for _ in range(4):
            with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                tone = (np.sin(np.arange(16_000) / 8.0) * 8000).astype("<i2")
                outcomes.append(run_stream(channel, vad_config(16_000), audio_requests(tone, 16_000)))
        for outcome in outcomes:
            assert outcome.errors == []
            assert outcome.end is not None

        # The parent's page adds up both workers' values.
        line = server.stdout.readline()
        match = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", line)
        assert match, f"unexpected second line: {line!r}"
        with urllib.request.urlopen(match.group(1), timeout=10) as response:
            page = response.read().decode()
        families = metrics.families_by_name(page)
        started = families["streaminfer_streams_started"].samples
        assert sum(sample.value for sample in started if sample.name.endswith("_total")) == 4
        received = families["streaminfer_chunks_received"].samples
        chunks = sum(len(outcome.acked[pb.MODALITY_AUDIO]) for outcome in outcomes)
        assert sum(sample.value for sample in received if sample.name.endswith("_total")) == chunks

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
