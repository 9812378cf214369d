"""A real Prometheus scrapes a real server under load, and PromQL over its HTTP API matches what the test sent.

Prometheus is Debian's binary (`make monitoring-tools`), listening on a free
loopback port with its storage in tmp_path, scraping the in-process server's
/metrics every second and evaluating deploy/prometheus/alerts.yml.

The server's counters are process-wide and other tests add to them, so the
checks compare values against a baseline scrape taken just before the load,
with PromQL's `@` modifier.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest
import yaml

from conftest import MEDIA, REPO_ROOT, ServerThread
from streaminfer.client import AsyncClient, ChunkFailed, Modality, iter_wav_chunks, read_wav_format, stream_config

WAV = MEDIA / "audio" / "speech_sample.wav"
ALERTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "streaminfer-dashboard.json"
STREAMS = 8
# Bounds of every wait on Prometheus: each poll sleeps POLL_S, at most WAIT_S in all.
WAIT_S = 60.0
POLL_S = 0.25
AUDIO = 'job="streaminfer", modality="audio"'


class Prometheus:
    """A Prometheus process on a loopback port. ``stop`` ends it by its PID."""

    def __init__(self, binary: str, directory, metrics_port: int) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": "streaminfer", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
            ],
        }
        self.config_path = directory / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = directory / "prometheus.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._log.close()

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:]

    def get(self, path: str, **parameters: str) -> dict:
        url = f"{self.base}{path}"
        if parameters:
            url += "?" + urllib.parse.urlencode(parameters)
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def query(self, expression: str, at: float) -> list[dict]:
        """Evaluate ``expression`` at Unix time ``at`` and return the vector's samples."""
        body = self.get("/api/v1/query", query=expression, time=f"{at:.3f}")
        assert body["status"] == "success", (expression, body)
        return body["data"]["result"]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base}/-/ready", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(POLL_S)
        pytest.fail(f"prometheus not ready within {WAIT_S} s:\n{self.log_tail()}")

    def wait_for_scrape_after(self, moment: float) -> float:
        """Wait for a stored scrape of the server that started after Unix time ``moment``. Return the scrape's time."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            # An unlabelled counter: present from the first successful scrape on.
            samples = self.query('timestamp(streaminfer_streams_started_total{job="streaminfer"})', time.time())
            if samples and float(samples[0]["value"][1]) > moment:
                return float(samples[0]["value"][1])
            time.sleep(POLL_S)
        pytest.fail(f"no scrape after {moment:.3f} within {WAIT_S} s:\n{self.log_tail()}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def value_of(samples: list[dict]) -> float:
    assert len(samples) == 1, samples
    return float(samples[0]["value"][1])


@pytest.fixture
def prometheus(server: ServerThread, tmp_path) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: run `make monitoring-tools`, which installs Debian's prometheus package")
    instance = Prometheus(binary, tmp_path, server.server.metrics_port)
    try:
        instance.wait_ready()
        yield instance
    finally:
        instance.stop()


async def stream_wav(target: str, bad_chunks: int) -> tuple[int, list[ChunkFailed], int]:
    """Stream the WAV with ``bad_chunks`` odd-length chunks spread through it. Return (sent, failures, acked)."""
    config = stream_config(["silero_vad"], audio=read_wav_format(str(WAV)))
    chunks = list(iter_wav_chunks(str(WAV), chunk_ms=32))
    # Half a PCM16 sample short, so the server rejects each with a ChunkError INVALID_ARGUMENT.
    bad_at = {len(chunks) * (index + 1) // (bad_chunks + 1) for index in range(bad_chunks)}
    failures = []
    async with AsyncClient(target) as client:
        async with await client.open_stream(config) as session:

            async def send() -> None:
                for position, chunk in enumerate(chunks):
                    if position in bad_at:
                        await session.send_audio(chunk.content[:-1], chunk.timestamp_s)
                    await session.send_audio(chunk.content, chunk.timestamp_s)
                await session.end_input()

            sender = asyncio.create_task(send())
            async for event in session:
                if isinstance(event, ChunkFailed):
                    failures.append(event)
            await sender
    audio = session.stats.modality(Modality.AUDIO)
    return audio.sent, failures, audio.acked


def drive_load(target: str, bad_per_stream: list[int]) -> list[tuple[int, list[ChunkFailed], int]]:
    async def run() -> list[tuple[int, list[ChunkFailed], int]]:
        streams = [stream_wav(target, bad) for bad in bad_per_stream]
        return await asyncio.wait_for(asyncio.gather(*streams), timeout=300)

    return asyncio.run(run())


def warm_up(server: ServerThread, prometheus: Prometheus) -> float:
    """Stream once with one bad chunk and wait for a scrape after it; return the scrape's time.

    A series that first appears with a count above zero loses that count in
    rate(), so every series the checks read must exist before the baseline.
    """
    prometheus.wait_for_scrape_after(0.0)
    up = prometheus.query('up{job="streaminfer"}', time.time())
    assert value_of(up) == 1.0
    assert up[0]["metric"]["instance"] == f"127.0.0.1:{server.server.metrics_port}"

    _, failures, _ = drive_load(server.target, [1])[0]
    assert len(failures) == 1
    return prometheus.wait_for_scrape_after(time.time())


def test_promql_over_real_scrapes(server: ServerThread, prometheus: Prometheus) -> None:
    baseline = warm_up(server, prometheus)

    # The load: 8 concurrent streams of a real recording, 1 to 3 bad chunks each.
    bad_per_stream = [index % 3 + 1 for index in range(STREAMS)]
    outcomes = drive_load(server.target, bad_per_stream)
    scraped = prometheus.wait_for_scrape_after(time.time())

    for bad, (sent, failures, acked) in zip(bad_per_stream, outcomes):
        assert [failure.reason for failure in failures] == ["INVALID_ARGUMENT"] * bad
        assert all("bytes" in failure.message for failure in failures)
        assert acked == sent - bad
    total_sent = sum(sent for sent, _, _ in outcomes)
    total_bad = sum(bad_per_stream)
    assert total_sent > STREAMS * 250

    # Chunks received: the count since the baseline is what the streams sent.
    received = (
        f"sum(streaminfer_chunks_received_total{{{AUDIO}}})"
        f" - sum(streaminfer_chunks_received_total{{{AUDIO}}} @ {baseline:.3f})"
    )
    assert value_of(prometheus.query(received, scraped)) == total_sent

    # Drops by reason since the baseline: only the bad chunks, as invalid_argument.
    dropped_by_reason = prometheus.query(
        f"sum by (reason) (streaminfer_chunks_dropped_total{{{AUDIO}}}"
        f" - streaminfer_chunks_dropped_total{{{AUDIO}}} @ {baseline:.3f})",
        scraped,
    )
    counts = {sample["metric"]["reason"]: float(sample["value"][1]) for sample in dropped_by_reason}
    assert {reason: count for reason, count in counts.items() if count} == {"invalid_argument": total_bad}

    # The drop rate: dropped over received since the baseline.
    drop_rate = (
        f"sum(streaminfer_chunks_dropped_total{{{AUDIO}}}"
        f" - streaminfer_chunks_dropped_total{{{AUDIO}}} @ {baseline:.3f})"
        f" / ({received})"
    )
    assert value_of(prometheus.query(drop_rate, scraped)) == pytest.approx(total_bad / total_sent, rel=1e-9)

    # p99 chunk latency per model over a window that starts before the baseline.
    window = math.ceil(scraped - baseline) + 2
    percentiles = {}
    for quantile in (0.5, 0.99):
        samples = prometheus.query(
            f"histogram_quantile({quantile}, sum by (model, le) "
            f'(rate(streaminfer_chunk_latency_seconds_bucket{{job="streaminfer"}}[{window}s])))',
            scraped,
        )
        percentiles[quantile] = {sample["metric"]["model"]: float(sample["value"][1]) for sample in samples}
    p99 = percentiles[0.99]["silero_vad"]
    assert math.isfinite(p99)
    # The top finite bucket is 10 s, and histogram_quantile returns it when chunks took longer.
    assert 0 < p99 <= 10.0
    assert percentiles[0.5]["silero_vad"] <= p99


def test_dashboard_and_rules_evaluate(server: ServerThread, prometheus: Prometheus) -> None:
    warm_up(server, prometheus)
    drive_load(server.target, [1, 0])
    scraped = prometheus.wait_for_scrape_after(time.time())

    # Every dashboard query is valid PromQL for this Prometheus, with Grafana's variables filled in.
    dashboard = json.loads(DASHBOARD.read_text())
    answered = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expression = (
                target["expr"]
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*")
                .replace("$model", ".*")
            )
            answered[(panel["title"], target["refId"])] = prometheus.query(expression, scraped)
    latency = answered[("Chunk latency per model (p50, p90, p99)", "C")]
    assert "silero_vad" in {sample["metric"]["model"] for sample in latency}
    assert answered[("Throughput", "A")], "no chunks/s on the throughput panel"

    # Every alert rule has been evaluated against the real series without an error.
    expected = {rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}
    deadline = time.monotonic() + WAIT_S
    rules = []
    while time.monotonic() < deadline:
        groups = prometheus.get("/api/v1/rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule["health"] != "unknown" for rule in rules):
            break
        time.sleep(POLL_S)
    assert {rule["name"] for rule in rules} == expected
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
