"""Load controls under overload and failure, against real servers on loopback.

Each test starts the servers it needs with small limits (write timeout, window,
admission, idle and duration limits), so the controls trigger in seconds. Some
checks read server internals (``Session._in_flight``, ledgers, the outbound
message) on the server's own event loop, because the client cannot see how
many chunks the server has read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import json
import logging
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import MEDIA, ServerThread, loopback_config
from streamutil import StreamOutcome, audio_requests, collect, jpeg, read_wav, run_stream, vad_config, video_frames
from streaminfer.server import metrics
from streaminfer.server.config import AdmissionConfig, LimitsConfig, ServerConfig
from streaminfer.server.session import Session
from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

TESTS = pathlib.Path(__file__).resolve().parent
CLIENT_SCRIPT = TESTS / "overload_client.py"
SPEECH = MEDIA / "audio" / "speech_sample.wav"

# A client channel that takes few response bytes before the application reads
# them, so a client that does not read blocks the server's writes quickly.
SMALL_WINDOWS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)]

WINDOW = 16
WRITE_TIMEOUT_S = 2.0
PUSHBACK_MS = 250
# Generous bounds for waits on a shared two-core machine.
WAIT_S = 30.0


# Helpers ----------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def server_config(models: tuple[str, ...], **changes: Any) -> ServerConfig:
    """Return the built-in config on a free loopback port, with only ``models`` and the given sections replaced."""
    base = loopback_config()
    return dataclasses.replace(base, models=tuple(model for model in base.models if model.name in models), **changes)


def limits(**changes: Any) -> LimitsConfig:
    return dataclasses.replace(LimitsConfig(), **changes)


@contextlib.contextmanager
def running(config: ServerConfig) -> Iterator[ServerThread]:
    thread = ServerThread(config).start()
    try:
        yield thread
    finally:
        thread.stop()


def on_loop(thread: ServerThread, function: Callable[[], Any]) -> Any:
    """Run ``function`` on the server's event loop and return its result."""

    async def call() -> Any:
        return function()

    assert thread.loop is not None
    return asyncio.run_coroutine_threadsafe(call(), thread.loop).result(timeout=WAIT_S)


def loop_task_count(thread: ServerThread) -> int:
    return on_loop(thread, lambda: len(asyncio.all_tasks()))


def session_labelled(thread: ServerThread, label: str) -> Session | None:
    assert thread.server is not None
    for session in list(thread.server.service.active_sessions):
        if session._config.label == label:
            return session
    return None


def active_count(thread: ServerThread) -> int:
    assert thread.server is not None
    return len(thread.server.service.active_sessions)


def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line in /proc/self/status")


class SessionProbe:
    """Record the peak of per-stream counters, sampled every few milliseconds on the server's event loop."""

    def __init__(self, thread: ServerThread) -> None:
        assert thread.server is not None and thread.loop is not None
        self._service = thread.server.service
        self._loop = thread.loop
        self._stopped = False
        self.peaks: dict[str, collections.Counter[str]] = {}

    def __enter__(self) -> SessionProbe:
        self._future = asyncio.run_coroutine_threadsafe(self._sample(), self._loop)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped = True
        self._future.result(timeout=WAIT_S)

    def peak(self, label: str, counter: str) -> int:
        return self.peaks.get(label, collections.Counter())[counter]

    async def _sample(self) -> None:
        while not self._stopped:
            for session in list(self._service.active_sessions):
                ledgers = session._ledgers.values()
                values = {
                    "in_flight": session._in_flight,
                    "pending": sum(len(ledger.pending) for ledger in ledgers),
                    "received": sum(ledger.received for ledger in ledgers),
                    "unsent_errors": len(session._outbound.errors),
                    "unsent_results": len(session._outbound.results),
                }
                peak = self.peaks.setdefault(session._config.label, collections.Counter())
                for name, value in values.items():
                    peak[name] = max(peak[name], value)
            await asyncio.sleep(0.002)


class QueuedStream:
    """A Stream call whose requests the test puts on a queue. ``half_close`` ends the input."""

    def __init__(self, channel: grpc.Channel, config: pb.StreamConfig | None, timeout: float = 45) -> None:
        self._requests: queue.Queue[pb.StreamRequest | None] = queue.Queue()
        if config is not None:
            self._requests.put(pb.StreamRequest(config=config))
        self.call = pb_grpc.InferenceServiceStub(channel).Stream(self._messages(), timeout=timeout)

    def _messages(self) -> Iterator[pb.StreamRequest]:
        while (request := self._requests.get(timeout=WAIT_S * 4)) is not None:
            yield request

    def send(self, request: pb.StreamRequest) -> None:
        self._requests.put(request)

    def half_close(self) -> None:
        self._requests.put(None)

    def read(self) -> pb.StreamResponse:
        return next(self.call)

    def read_until_acked(self) -> pb.StreamResponse:
        """Read responses until one carries an ack, and return it."""
        while not (response := self.read()).acks:
            pass
        return response

    def finish(self) -> StreamOutcome:
        """Half-close and collect the rest of the stream."""
        self.half_close()
        return collect(self.call)

    def cancel(self) -> None:
        self.call.cancel()
        self._requests.put(None)


def status_of(responses: Iterator[pb.StreamResponse]) -> tuple[StreamOutcome, grpc.RpcError | None]:
    """Collect ``responses`` until the call ends and return them with the call's error, or None for OK."""
    seen: list[pb.StreamResponse] = []

    def record() -> Iterator[pb.StreamResponse]:
        for response in responses:
            seen.append(response)
            yield response

    try:
        outcome = collect(record())
    except grpc.RpcError as error:
        return collect(iter(seen)), error
    return outcome, None


def totals_of(outcome: StreamOutcome, modality: int) -> pb.ModalityTotals:
    assert outcome.end is not None, "no StreamEnd"
    for totals in outcome.end.totals:
        if totals.modality == modality:
            return totals
    raise AssertionError(f"StreamEnd has no totals for {pb.Modality.Name(modality)}: {outcome.end}")


def speech_requests() -> tuple[list[pb.StreamRequest], int]:
    samples, rate = read_wav(SPEECH)
    return audio_requests(samples, rate), rate


def labelled(config: pb.StreamConfig, label: str) -> pb.StreamConfig:
    config.label = label
    return config


def text_config(label: str = "") -> pb.StreamConfig:
    return pb.StreamConfig(models=[pb.ModelSelection(model="minilm_embedding")], label=label)


def video_config(policy: int = pb.OVERFLOW_POLICY_UNSPECIFIED, label: str = "") -> pb.StreamConfig:
    return pb.StreamConfig(
        models=[pb.ModelSelection(model="hog_people")],
        video_format=pb.VideoFormat(encoding=pb.IMAGE_ENCODING_JPEG),
        video_overflow_policy=policy,
        label=label,
    )


def health_status(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


# Servers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def limits_server() -> Iterator[ServerThread]:
    """All three stream models, a small window and a short write timeout."""
    config = server_config(
        ("silero_vad", "minilm_embedding", "hog_people"),
        limits=limits(max_chunks_in_flight=WINDOW, write_timeout_s=WRITE_TIMEOUT_S),
    )
    with running(config) as thread:
        yield thread


@pytest.fixture
def limits_channel(limits_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(limits_server.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def frames_jpeg() -> list[bytes]:
    return [jpeg(frame) for frame in video_frames(MEDIA / "video" / "vtest.avi", range(24))]


# 1. A client that does not read its results ------------------------------------


class NonReadingStream:
    """A text stream on a small-window channel that sends sentences and never reads a response."""

    SENTENCES = 1000

    def __init__(self, thread: ServerThread, label: str) -> None:
        self.label = label
        self.channel = grpc.insecure_channel(thread.target, options=SMALL_WINDOWS)
        self._release = threading.Event()
        self.call = pb_grpc.InferenceServiceStub(self.channel).Stream(self._messages(), timeout=120)

    def _messages(self) -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(config=text_config(self.label))
        for sequence_number in range(self.SENTENCES):
            if self._release.is_set():
                return
            text = f"Sentence {sequence_number} is one more short sentence to embed. ".encode()
            yield pb.StreamRequest(text=pb.TextChunk(sequence_number=sequence_number, text=text))
        self._release.wait(timeout=120)

    def close(self) -> None:
        self._release.set()
        self.call.cancel()
        self.channel.close()


@contextlib.contextmanager
def non_reader(thread: ServerThread, label: str) -> Iterator[tuple[NonReadingStream, Session]]:
    """Start a NonReadingStream and wait until its window is full and a response write is blocked."""
    stream = NonReadingStream(thread, label)
    try:
        assert wait_until(lambda: session_labelled(thread, label) is not None), "the stream was never admitted"
        session = session_labelled(thread, label)
        assert session is not None
        assert wait_until(
            lambda: session._in_flight == WINDOW and session.write_started_at is not None
        ), f"the window never filled with a write blocked: {session._in_flight} in flight"
        yield stream, session
    finally:
        stream.close()


def write_timeouts(thread: ServerThread) -> int:
    assert thread.server is not None
    return thread.server.monitor.streams_ended["write_timeout"]


def test_non_reader_held_back_neighbour_served(limits_server: ServerThread, limits_channel: grpc.Channel) -> None:
    service = limits_server.server.service
    requests, rate = speech_requests()
    timeouts_before = write_timeouts(limits_server)

    with non_reader(limits_server, "non-reader") as (stream, session):
        received = session._ledgers[pb.MODALITY_TEXT].received
        neighbour = run_stream(limits_channel, labelled(vad_config(rate), "neighbour"), requests)
        received_after_neighbour = session._ledgers[pb.MODALITY_TEXT].received

        assert wait_until(lambda: write_timeouts(limits_server) > timeouts_before, WRITE_TIMEOUT_S + WAIT_S)
        outcome, error = status_of(stream.call)
        assert wait_until(lambda: session not in service.active_sessions)

    assert received < NonReadingStream.SENTENCES
    assert received_after_neighbour == received
    assert neighbour.errors == []
    assert neighbour.answered(pb.MODALITY_AUDIO) == list(range(len(requests)))
    assert neighbour.end is not None
    assert neighbour.end.reason == pb.STREAM_END_REASON_INPUT_ENDED
    assert error is not None
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "write_timeout_s" in error.details()
    assert outcome.end is None
    assert session.closed


def test_write_timeout_frees_unread_stream(limits_server: ServerThread) -> None:
    service = limits_server.server.service
    timeouts_before = write_timeouts(limits_server)
    with non_reader(limits_server, "unread") as (stream, session):
        assert wait_until(lambda: write_timeouts(limits_server) > timeouts_before, WRITE_TIMEOUT_S + WAIT_S)
        freed = wait_until(lambda: session not in service.active_sessions, 10.0)
        assert freed, "the session is still in active_sessions 10 s after the write timeout ended it"
        assert session.closed


def test_write_timeout_logs_no_errors(limits_server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    service = limits_server.server.service
    timeouts_before = write_timeouts(limits_server)
    with non_reader(limits_server, "logged") as (stream, session):
        assert wait_until(lambda: write_timeouts(limits_server) > timeouts_before, WRITE_TIMEOUT_S + WAIT_S)
        _, error = status_of(stream.call)
        assert wait_until(lambda: session not in service.active_sessions)
    assert error is not None
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    errors = [f"{record.name}: {record.getMessage()}" for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []


# 2. A client that floods without waiting for acks --------------------------


def test_flood_stays_within_window(limits_server: ServerThread, limits_channel: grpc.Channel) -> None:
    requests, rate = speech_requests()
    # Three passes of the recording, numbered on.
    contents = [request.audio.audio_content for request in requests] * 3

    def messages() -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(config=labelled(vad_config(rate), "flood"))
        for sequence_number, content in enumerate(contents):
            yield pb.StreamRequest(audio=pb.AudioChunk(sequence_number=sequence_number, audio_content=content))

    overruns_before = metrics.WINDOW_OVERRUNS._value.get()
    with SessionProbe(limits_server) as probe:
        outcome = collect(pb_grpc.InferenceServiceStub(limits_channel).Stream(messages(), timeout=120))

    answered = outcome.answered(pb.MODALITY_AUDIO)
    totals = totals_of(outcome, pb.MODALITY_AUDIO)
    # The stream is counted once, however many chunks it sent beyond the window.
    assert metrics.WINDOW_OVERRUNS._value.get() == overruns_before + 1
    assert probe.peak("flood", "received") == len(contents)
    assert probe.peak("flood", "in_flight") <= WINDOW
    assert probe.peak("flood", "pending") <= WINDOW
    assert answered == list(range(len(contents)))
    assert totals.chunks_received == len(contents)
    assert totals.chunks_acked + totals.chunks_failed == len(contents)
    assert outcome.end.reason == pb.STREAM_END_REASON_INPUT_ENDED


def test_rejected_flood_stays_bounded(limits_server: ServerThread) -> None:
    requests, rate = speech_requests()
    release = threading.Event()

    def messages() -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(config=labelled(vad_config(rate), "rejected-flood"))
        yield pb.StreamRequest(audio=pb.AudioChunk(sequence_number=0, audio_content=requests[0].audio.audio_content))
        for _ in range(200_000):
            if release.is_set():
                return
            # Not greater than the previous number: rejected at once with INVALID_ARGUMENT.
            yield pb.StreamRequest(audio=pb.AudioChunk(sequence_number=0, audio_content=b"\0\0"))
        release.wait(timeout=120)

    timeouts_before = write_timeouts(limits_server)
    with grpc.insecure_channel(limits_server.target, options=SMALL_WINDOWS) as channel, SessionProbe(limits_server) as probe:
        call = pb_grpc.InferenceServiceStub(channel).Stream(messages(), timeout=120)
        try:
            assert wait_until(lambda: write_timeouts(limits_server) > timeouts_before, WRITE_TIMEOUT_S + WAIT_S)
        finally:
            release.set()
            call.cancel()
    assert wait_until(lambda: session_labelled(limits_server, "rejected-flood") is None)
    assert probe.peak("rejected-flood", "unsent_errors") <= WINDOW


# 3. Admission -------------------------------------------------------------------

ADMISSION_LIMIT = 4


@pytest.fixture(scope="module")
def admission_server() -> Iterator[ServerThread]:
    config = server_config(
        ("silero_vad",),
        admission=AdmissionConfig(max_streams=ADMISSION_LIMIT, max_queue_wait_ms=0, max_busy_fraction=0, retry_pushback_ms=PUSHBACK_MS),
    )
    with running(config) as thread:
        yield thread


def test_stream_over_limit_rejected(admission_server: ServerThread) -> None:
    requests, rate = speech_requests()
    with grpc.insecure_channel(admission_server.target) as channel:
        admitted = [QueuedStream(channel, labelled(vad_config(rate), f"admitted-{i}")) for i in range(ADMISSION_LIMIT)]
        try:
            firsts = [stream.read() for stream in admitted]
            over = QueuedStream(channel, vad_config(rate))
            rejected, rejection = status_of(over.call)
            over.cancel()

            # The admitted streams keep working. FLUSH makes VAD finish the short chunk.
            for stream in admitted[1:]:
                stream.send(requests[0])
                stream.send(pb.StreamRequest(control=pb.StreamControl(action=pb.CONTROL_ACTION_FLUSH)))
            answers = [stream.read_until_acked() for stream in admitted[1:]]

            # After one ends, a new stream is admitted.
            closed = admitted[0].finish()
            assert wait_until(lambda: active_count(admission_server) == ADMISSION_LIMIT - 1)
            replacement = QueuedStream(channel, vad_config(rate))
            replacement_first = replacement.read()
            replacement.cancel()
        finally:
            for stream in admitted:
                stream.cancel()

    assert all(first.HasField("session_accepted") for first in firsts)
    assert rejected.responses == []
    assert rejection is not None
    assert rejection.code() == grpc.StatusCode.UNAVAILABLE
    assert "admission.max_streams" in rejection.details()
    assert dict(rejection.trailing_metadata())["grpc-retry-pushback-ms"] == str(PUSHBACK_MS)
    assert [[(ack.first_sequence_number, ack.last_sequence_number) for ack in answer.acks] for answer in answers] == [
        [(0, 0)]
    ] * (ADMISSION_LIMIT - 1)
    assert closed.end is not None
    assert closed.end.reason == pb.STREAM_END_REASON_INPUT_ENDED
    assert replacement_first.HasField("session_accepted")
    assert wait_until(lambda: active_count(admission_server) == 0)


def test_burst_of_streams_admitted_or_rejected() -> None:
    count, limit = 2000, 50
    config = server_config(
        ("silero_vad",),
        admission=AdmissionConfig(max_streams=limit, max_queue_wait_ms=0, max_busy_fraction=0, retry_pushback_ms=PUSHBACK_MS),
    )
    with running(config) as thread:
        outcomes = run_client("burst", thread.target, str(count))
        assert wait_until(lambda: active_count(thread) == 0)
        rejected = dict(thread.server.service.rejected)

    assert outcomes["accepted"] + outcomes["unavailable"] == count, json.dumps(outcomes)
    assert rejected == {"UNAVAILABLE": outcomes["unavailable"]}
    assert outcomes["unavailable_with_pushback"] == outcomes["unavailable"]
    assert 1 <= outcomes["accepted"] <= limit
    assert outcomes["ended_ok"] == outcomes["accepted"]
    assert outcomes["health_during_burst"] >= 1
    # Every check returned SERVING: no failed call, no other status.
    assert sorted(key for key in outcomes if key.startswith("health_")) == ["health_during_burst", "health_serving"]


def run_client(*arguments: str) -> dict[str, int]:
    """Run overload_client.py with ``arguments`` and return the JSON line it prints."""
    finished = subprocess.run(
        [sys.executable, str(CLIENT_SCRIPT), *arguments], capture_output=True, text=True, timeout=WAIT_S * 4
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    return json.loads(finished.stdout.splitlines()[-1])


# 4. Streams opened and cancelled in a loop --------------------------------------


class LineReader:
    """Read a subprocess's stdout lines on a thread, so the test can wait for one with a timeout."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self._lines.put(line)

    def next_line(self, timeout: float = WAIT_S * 2) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output line within {timeout:g} s") from None


@contextlib.contextmanager
def client_process(*arguments: str) -> Iterator[tuple[subprocess.Popen[str], LineReader]]:
    process = subprocess.Popen(
        [sys.executable, str(CLIENT_SCRIPT), *arguments],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield process, LineReader(process)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=WAIT_S)


def test_churn_frees_sessions_tasks_memory() -> None:
    rounds, per_round, batch = 10, 1000, 100
    requests, rate = speech_requests()
    # Opening and cancelling streams this fast makes the busy fraction price each stream by its setup.
    # This test is about freeing streams, so admission takes every one.
    with running(server_config(("silero_vad",), admission=AdmissionConfig(max_busy_fraction=0))) as thread:
        tasks_at_start = loop_task_count(thread)
        tasks, rss, outcomes = [], [], []
        # Round 0 warms up allocator arenas and gRPC's caches. The RSS baseline is taken after it.
        with client_process("churn", thread.target, str(rounds + 1), str(per_round), str(batch)) as (process, lines):
            assert process.stdin is not None
            for round_index in range(rounds + 1):
                outcomes.append(json.loads(lines.next_line()))
                assert wait_until(lambda: active_count(thread) == 0), f"round {round_index} left streams open"
                assert wait_until(lambda: loop_task_count(thread) <= tasks_at_start)
                gc.collect()
                tasks.append(loop_task_count(thread))
                rss.append(rss_mib())
                if round_index < rounds:
                    process.stdin.write("\n")
                    process.stdin.flush()
            assert process.wait(timeout=WAIT_S) == 0
        with grpc.insecure_channel(thread.target) as channel:
            neighbour = run_stream(channel, vad_config(rate), requests)

    streams_per_kind = per_round // 3
    for outcome in outcomes:
        assert outcome["cancelled_at_once"] + outcome["accepted"] == per_round, outcome
        assert outcome["answered"] == streams_per_kind, outcome
    assert tasks == [tasks_at_start] * (rounds + 1)
    # Measured on the test machine (2 cores, grpcio 1.85): the warm-up round
    # adds about 30 MiB, the next 10,000 streams 20-30 MiB, nearly all of it in
    # the first 4,000, then RSS stays flat within +-8 MiB. A leak of 5 KiB per
    # stream would add 24 MiB over the last 5,000 streams.
    assert rss[-1] - rss[0] < 64, f"RSS after each round, MiB: {rss}"
    assert rss[-1] - rss[rounds // 2] < 24, f"RSS after each round, MiB: {rss}"
    assert neighbour.errors == []
    assert neighbour.answered(pb.MODALITY_AUDIO) == list(range(len(requests)))


# 5. Idle timeout and maximum stream duration ------------------------------------


def test_idle_stream_ended() -> None:
    # One VAD window at 16 kHz: the model completes it without waiting for more audio.
    window = pb.StreamRequest(audio=pb.AudioChunk(sequence_number=0, audio_content=bytes(512 * 2)))
    with running(server_config(("silero_vad",), limits=limits(idle_timeout_s=1.0))) as thread:
        with grpc.insecure_channel(thread.target) as channel:
            stream = QueuedStream(channel, labelled(vad_config(16_000), "idle"), timeout=WAIT_S)
            stream.send(window)
            outcome, error = status_of(stream.call)
            stream.cancel()
        assert wait_until(lambda: active_count(thread) == 0)

    accepted = outcome.responses[0].session_accepted
    assert accepted.limits.idle_timeout.seconds == 1
    assert outcome.end is not None
    assert outcome.end.reason == pb.STREAM_END_REASON_IDLE_TIMEOUT
    assert outcome.acked == {pb.MODALITY_AUDIO: [0]}
    assert outcome.errors == []
    assert totals_of(outcome, pb.MODALITY_AUDIO).chunks_received == 1
    assert error is not None
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "idle_timeout_s" in error.details()


def test_idle_stream_with_buffered_chunk_ended() -> None:
    requests, rate = speech_requests()
    with running(server_config(("silero_vad",), limits=limits(idle_timeout_s=1.0))) as thread:
        with grpc.insecure_channel(thread.target) as channel:
            stream = QueuedStream(channel, labelled(vad_config(rate), "idle-buffered"), timeout=10)
            stream.send(requests[0])
            outcome, error = status_of(stream.call)
            stream.cancel()
        assert wait_until(lambda: active_count(thread) == 0)

    assert outcome.end is not None, f"no StreamEnd; the call ended with {error}"
    assert outcome.end.reason == pb.STREAM_END_REASON_IDLE_TIMEOUT
    assert outcome.answered(pb.MODALITY_AUDIO) == [0]
    assert error is not None
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED


class RealTimeAudio:
    """Requests for a stream that sends the speech recording in real time, looping, until stopped."""

    def __init__(self, config: pb.StreamConfig, max_chunks: int = 1000) -> None:
        self.requests, rate = speech_requests()
        self.config = config
        self.max_chunks = max_chunks
        self.stop = threading.Event()
        self.sent = 0

    def __iter__(self) -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(config=self.config)
        for sequence_number in range(self.max_chunks):
            if self.stop.wait(0.032):
                return
            content = self.requests[sequence_number % len(self.requests)].audio.audio_content
            yield pb.StreamRequest(audio=pb.AudioChunk(sequence_number=sequence_number, audio_content=content))
            self.sent += 1


def assert_every_read_chunk_answered(outcome: StreamOutcome, modality: int = pb.MODALITY_AUDIO) -> None:
    totals = totals_of(outcome, modality)
    answered = outcome.answered(modality)
    assert totals.chunks_received >= 1
    assert answered == list(range(totals.chunks_received))
    assert totals.chunks_acked == len(outcome.acked.get(modality, []))
    assert totals.chunks_failed == len([error for error in outcome.errors if error.modality == modality])


def test_max_duration_ends_stream() -> None:
    rate = read_wav(SPEECH)[1]
    audio = RealTimeAudio(labelled(vad_config(rate), "long"))
    with running(server_config(("silero_vad",), limits=limits(max_stream_duration_s=2.0))) as thread:
        with grpc.insecure_channel(thread.target) as channel:
            try:
                outcome, error = status_of(pb_grpc.InferenceServiceStub(channel).Stream(iter(audio), timeout=WAIT_S))
            finally:
                audio.stop.set()
        assert wait_until(lambda: active_count(thread) == 0)

    assert outcome.end is not None
    assert outcome.end.reason == pb.STREAM_END_REASON_MAX_DURATION
    assert error is not None
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "max_stream_duration_s" in error.details()
    assert_every_read_chunk_answered(outcome)
    assert totals_of(outcome, pb.MODALITY_AUDIO).chunks_received <= audio.sent
    assert {error.reason for error in outcome.errors} <= {pb.CHUNK_ERROR_REASON_SHUTDOWN}


# 6. Call deadline -----------------------------------------------------------------


def test_call_deadline_frees_session(limits_server: ServerThread, limits_channel: grpc.Channel) -> None:
    rate = read_wav(SPEECH)[1]
    audio = RealTimeAudio(labelled(vad_config(rate), "short-deadline"))
    call = pb_grpc.InferenceServiceStub(limits_channel).Stream(iter(audio), timeout=2.0)
    try:
        outcome, error = status_of(call)
    finally:
        audio.stop.set()
    assert error is not None
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert outcome.responses[0].HasField("session_accepted")
    assert wait_until(lambda: session_labelled(limits_server, "short-deadline") is None)


# 7. Cancellation ------------------------------------------------------------------


def test_killed_client_frees_session(limits_server: ServerThread, limits_channel: grpc.Channel) -> None:
    requests, rate = speech_requests()
    service = limits_server.server.service
    with client_process("hold", limits_server.target, str(SPEECH)) as (process, lines):
        accepted = lines.next_line()
        stream_id = accepted.split()[-1]
        assert wait_until(lambda: any(session.stream_id == stream_id for session in list(service.active_sessions)))
        process.kill()
        assert process.wait(timeout=WAIT_S) == -signal.SIGKILL
    freed = wait_until(lambda: all(session.stream_id != stream_id for session in list(service.active_sessions)))
    neighbour = run_stream(limits_channel, vad_config(rate), requests)

    assert accepted.startswith("accepted ")
    assert freed
    assert neighbour.errors == []
    assert neighbour.answered(pb.MODALITY_AUDIO) == list(range(len(requests)))


def test_cancelled_stream_frees_session(limits_server: ServerThread, limits_channel: grpc.Channel) -> None:
    requests, rate = speech_requests()
    stream = QueuedStream(limits_channel, labelled(vad_config(rate), "cancelled"))
    first = stream.read()
    for request in requests[:50]:
        stream.send(request)
    answer = stream.read()
    assert wait_until(lambda: session_labelled(limits_server, "cancelled") is not None)
    session = session_labelled(limits_server, "cancelled")
    stream.cancel()
    freed = wait_until(lambda: session_labelled(limits_server, "cancelled") is None)
    neighbour = run_stream(limits_channel, vad_config(rate), requests)

    assert first.HasField("session_accepted")
    assert answer.acks or answer.errors or answer.results
    assert freed
    assert session.closed
    assert neighbour.errors == []
    assert neighbour.answered(pb.MODALITY_AUDIO) == list(range(len(requests)))


# 8. Keep-latest video ---------------------------------------------------------------


def frame_requests(frames: list[bytes]) -> list[pb.StreamRequest]:
    return [
        pb.StreamRequest(frame=pb.VideoFrame(sequence_number=index, image_content=frame))
        for index, frame in enumerate(frames)
    ]


def assert_results_before_acks(outcome: StreamOutcome, modality: int) -> None:
    """Each acked chunk has a result in the same or an earlier message than its ack."""
    covered: set[int] = set()
    for response in outcome.responses:
        for result in response.results:
            if result.modality == modality:
                covered.update(range(result.first_sequence_number, result.last_sequence_number + 1))
        for ack in response.acks:
            if ack.modality == modality:
                acked = set(range(ack.first_sequence_number, ack.last_sequence_number + 1))
                assert acked <= covered, f"acked before its result: {sorted(acked - covered)}"


def test_keep_latest_drops_older_frames(limits_channel: grpc.Channel, frames_jpeg: list[bytes]) -> None:
    outcome = run_stream(limits_channel, video_config(label="keep-latest"), frame_requests(frames_jpeg))

    count = len(frames_jpeg)
    acked = outcome.acked.get(pb.MODALITY_VIDEO, [])
    newer = {
        error.sequence_number: int(match.group(1))
        for error in outcome.errors
        if (match := re.search(r"dropped for newer frame (\d+)", error.message))
    }
    assert outcome.answered(pb.MODALITY_VIDEO) == list(range(count))
    assert len(outcome.errors) >= 1
    assert {error.reason for error in outcome.errors} == {pb.CHUNK_ERROR_REASON_OVERFLOW}
    assert sorted(newer) == sorted(error.sequence_number for error in outcome.errors)
    assert all(newer_frame > dropped for dropped, newer_frame in newer.items()), newer
    assert count - 1 in acked
    assert sorted(result.first_sequence_number for result in outcome.results) == acked
    assert_results_before_acks(outcome, pb.MODALITY_VIDEO)
    assert totals_of(outcome, pb.MODALITY_VIDEO).chunks_failed == len(outcome.errors)


def test_backpressure_drops_no_frames(limits_channel: grpc.Channel, frames_jpeg: list[bytes]) -> None:
    config = video_config(pb.OVERFLOW_POLICY_BACKPRESSURE, label="backpressure")
    outcome = run_stream(limits_channel, config, frame_requests(frames_jpeg))

    count = len(frames_jpeg)
    assert outcome.errors == []
    assert outcome.acked[pb.MODALITY_VIDEO] == list(range(count))
    assert sorted(result.first_sequence_number for result in outcome.results) == list(range(count))
    assert_results_before_acks(outcome, pb.MODALITY_VIDEO)


# 9. Chunk latency budget -------------------------------------------------------------


def test_tiny_budget_drops_with_deadline(limits_channel: grpc.Channel, frames_jpeg: list[bytes]) -> None:
    config = pb.StreamConfig(
        models=[pb.ModelSelection(model="hog_people"), pb.ModelSelection(model="minilm_embedding")],
        video_format=pb.VideoFormat(encoding=pb.IMAGE_ENCODING_JPEG),
        video_overflow_policy=pb.OVERFLOW_POLICY_BACKPRESSURE,
        label="tiny-budget",
    )
    config.chunk_latency_budget.FromMilliseconds(1)
    sentences = [f"Sentence {index} waits behind the busy models. ".encode() for index in range(12)]
    requests = []
    for index, frame in enumerate(frames_jpeg[:12]):
        requests.append(pb.StreamRequest(frame=pb.VideoFrame(sequence_number=index, image_content=frame)))
        requests.append(pb.StreamRequest(text=pb.TextChunk(sequence_number=index, text=sentences[index])))

    outcome = run_stream(limits_channel, config, requests)

    reasons = collections.Counter(pb.ChunkErrorReason.Name(error.reason) for error in outcome.errors)
    assert outcome.responses[0].session_accepted.limits.chunk_latency_budget.ToMilliseconds() == 1
    assert outcome.answered(pb.MODALITY_VIDEO) == list(range(12))
    assert outcome.answered(pb.MODALITY_TEXT) == list(range(12))
    assert set(reasons) == {"CHUNK_ERROR_REASON_DEADLINE"}
    assert any(error.modality == pb.MODALITY_VIDEO for error in outcome.errors)
    assert all("chunk latency budget" in error.message for error in outcome.errors)
    for modality in (pb.MODALITY_VIDEO, pb.MODALITY_TEXT):
        totals = totals_of(outcome, modality)
        assert totals.chunks_received == 12
        assert totals.chunks_acked + totals.chunks_failed == 12


# 10. SIGTERM under load ----------------------------------------------------------------


@contextlib.contextmanager
def server_process(
    tmp_path: pathlib.Path, grace_s: float, model: str = "silero_vad"
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run `streaminfer serve` with one model and yield the process and its target."""
    config = tmp_path / "server.toml"
    config.write_text(f'[[models]]\nname = "{model}"\n')
    log = tmp_path / "server.log"
    with open(log, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(
            [
                str(pathlib.Path(sys.executable).with_name("streaminfer")),
                "serve", "--config", str(config), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--grace", str(grace_s),
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
    try:
        line = LineReader(process).next_line(timeout=120)
        match = re.fullmatch(r"streaminfer listening on (127\.0\.0\.1:\d+)\n", line)
        assert match, f"unexpected first line {line!r}; log: {log.read_text()[-2000:]}"
        yield process, match.group(1)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=WAIT_S)


class StreamThread:
    """A real-time audio stream read to its end on a thread."""

    def __init__(self, channel: grpc.Channel, label: str) -> None:
        rate = read_wav(SPEECH)[1]
        self.audio = RealTimeAudio(labelled(vad_config(rate), label))
        self.responses: list[pb.StreamResponse] = []
        self.outcome: StreamOutcome | None = None
        self.error: grpc.RpcError | None = None
        self._call = pb_grpc.InferenceServiceStub(channel).Stream(iter(self.audio), timeout=WAIT_S * 2)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        def record() -> Iterator[pb.StreamResponse]:
            for response in self._call:
                self.responses.append(response)
                yield response

        try:
            self.outcome, self.error = status_of(record())
        finally:
            self.audio.stop.set()

    @property
    def ended(self) -> bool:
        return not self._thread.is_alive()

    def has_ack(self) -> bool:
        return any(response.acks for response in list(self.responses))

    def join(self) -> None:
        self._thread.join(timeout=WAIT_S * 2)
        self.audio.stop.set()
        self._call.cancel()


def test_sigterm_drains_open_streams(tmp_path: pathlib.Path) -> None:
    with server_process(tmp_path, grace_s=3.0) as (process, target), grpc.insecure_channel(target) as channel:
        streams = [StreamThread(channel, f"draining-{index}") for index in range(3)]
        try:
            assert wait_until(lambda: all(stream.has_ack() for stream in streams))
            process.send_signal(signal.SIGTERM)
            assert wait_until(lambda: health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING)
            late = QueuedStream(channel, vad_config(16_000), timeout=WAIT_S)
            _, rejection = status_of(late.call)
            late.cancel()
            open_when_rejected = [not stream.ended for stream in streams]
        finally:
            for stream in streams:
                stream.join()
        exit_code = process.wait(timeout=WAIT_S * 2)

    assert rejection is not None
    assert rejection.code() == grpc.StatusCode.UNAVAILABLE
    assert open_when_rejected == [True] * 3
    for stream in streams:
        assert stream.outcome is not None
        assert stream.outcome.end is not None
        assert stream.outcome.end.reason == pb.STREAM_END_REASON_DRAINING
        assert stream.error is not None
        assert stream.error.code() == grpc.StatusCode.UNAVAILABLE
        assert_every_read_chunk_answered(stream.outcome)
    assert exit_code == 0


def test_second_sigterm_stops_at_once(tmp_path: pathlib.Path) -> None:
    # The grace is longer than every wait below, so an exit proves the second signal cut the drain short.
    with server_process(tmp_path, grace_s=600.0) as (process, target), grpc.insecure_channel(target) as channel:
        stream = StreamThread(channel, "interrupted")
        try:
            assert wait_until(stream.has_ack)
            process.send_signal(signal.SIGTERM)
            assert wait_until(lambda: health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING)
            process.send_signal(signal.SIGTERM)
            exit_code = process.wait(timeout=WAIT_S * 2)
        finally:
            stream.join()

    assert exit_code == 1
    assert stream.ended
    assert stream.error is not None
    assert stream.error.code() == grpc.StatusCode.UNAVAILABLE
