"""Log lines: stream ids, JSON lines, per-chunk lines on request, repeats held back."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import subprocess
import sys

import grpc

from streaminfer.server import logs
from streaminfer.v1 import streaminfer_pb2 as pb

from conftest import MEDIA
from streamutil import audio_requests, read_wav, run_stream, vad_config


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def logger_into(stream: io.StringIO, *filters: logging.Filter, formatter: logging.Formatter | None = None) -> logging.Logger:
    logger = logging.getLogger(f"test-logs-{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter or logging.Formatter(logs.TEXT_FORMAT))
    for log_filter in filters:
        handler.addFilter(log_filter)
    logger.handlers[:] = [handler]
    return logger


def test_repeats_are_held_back_and_counted() -> None:
    clock = FakeClock()
    output = io.StringIO()
    logger = logger_into(output, logs.StreamIdFilter(), logs.RepeatLimiter(window_s=10.0, limit=3, clock=clock))
    for index in range(12):
        logger.warning("client %d sent too much", index)
        clock.now += 0.1
    logger.warning("another template")
    lines = output.getvalue().splitlines()
    assert len(lines) == 4
    assert [line.endswith(f"client {index} sent too much") for index, line in enumerate(lines[:3])] == [True] * 3

    clock.now = 20.0
    logger.warning("client %d sent too much", 99)
    last = output.getvalue().splitlines()[-1]
    assert "client 99 sent too much [9 more like this in the last 10 s were not logged]" in last

    # Lines asked for one by one are never held back.
    for index in range(10):
        logger.info("chunk %d read", index, extra=logs.EVERY_TIME)
    assert sum("read" in line for line in output.getvalue().splitlines()) == 10


def test_stream_id_on_text_and_json_lines() -> None:
    output = io.StringIO()
    logger = logger_into(output, logs.StreamIdFilter())
    token = logs.STREAM_ID.set("abc123")
    try:
        logger.info("batch done")
        logger.info("stream abc123: ended")
    finally:
        logs.STREAM_ID.reset(token)
    logger.info("no stream here")
    logger.info("model m failed on an item of stream 0123456789abcdef")
    first, second, third, fourth = output.getvalue().splitlines()
    assert first.endswith("[abc123]: batch done")
    assert "[abc123]" not in second, "a line that names its stream does not name it twice"
    assert third.endswith(": no stream here")
    assert "[" not in fourth

    output = io.StringIO()
    logger = logger_into(output, logs.StreamIdFilter(), formatter=logs.JsonFormatter({"worker": 1}))
    token = logs.STREAM_ID.set("abc123")
    try:
        try:
            raise ValueError("bad input")
        except ValueError:
            logger.exception("failed")
    finally:
        logs.STREAM_ID.reset(token)
    logger.info("stream 0123456789abcdef: window full")
    entry, other = map(json.loads, output.getvalue().splitlines())
    assert other["stream_id"] == "0123456789abcdef"
    assert entry["stream_id"] == "abc123"
    assert entry["worker"] == 1
    assert entry["level"] == "ERROR"
    assert entry["message"] == "failed"
    assert "ValueError: bad input" in entry["exception"]


def test_server_json_lines_with_chunk_logs(tmp_path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('[[models]]\nname = "silero_vad"\n')
    server = subprocess.Popen(
        [sys.executable, "-m", "streaminfer.server.cli", "--log-format", "json", "serve", "--config", str(config),
         "--port", "0", "--metrics-port", "-1", "--log-chunks"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", server.stdout.readline())
        assert match
        samples, rate = read_wav(MEDIA / "audio" / "Front_Left.wav")
        requests = audio_requests(samples, rate)[:5]
        requests.append(pb.StreamRequest(audio=pb.AudioChunk(sequence_number=5, audio_content=b"\x00")))
        with grpc.insecure_channel(f"127.0.0.1:{match.group(1)}") as channel:
            outcome = run_stream(channel, vad_config(rate), requests)
        assert len(outcome.errors) == 1
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
        assert server.returncode == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)

    entries = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert entries, "the server logged nothing"
    stream_ids = {entry["stream_id"] for entry in entries if "stream_id" in entry}
    assert len(stream_ids) == 1
    (stream_id,) = stream_ids
    stream_lines = [entry["message"] for entry in entries if entry.get("stream_id") == stream_id]
    assert any(message.startswith(f"stream {stream_id} started: peer ") for message in stream_lines)
    for sequence_number in range(6):
        assert any(f"audio chunk {sequence_number} read" in message for message in stream_lines), sequence_number
    for sequence_number in range(5):
        assert any(f"audio chunk {sequence_number} acked" in message for message in stream_lines), sequence_number
    assert any("audio chunk 5 failed: audio.audio_content has 1 bytes" in message for message in stream_lines)
    assert any(message.startswith(f"stream {stream_id} ended: OK") for message in stream_lines)
