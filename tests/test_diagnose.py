"""`streaminfer diagnose`: the report on synthetic pages, and on real servers with a bottleneck induced.

The synthetic pages are written here from scratch, one per bottleneck, and the
verdict must name it. The induced bottlenecks run a real server in this
process with a few seconds of load from client threads. Their assertions
compare the bottleneck's share with the other stages, not absolute times,
because the test machine is small and shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import io
import json
import pathlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from conftest import MEDIA, ServerThread, loopback_config
from streamutil import jpeg, read_wav, video_frames
from streaminfer.server import diagnose, metrics
from streaminfer.server.cli import build_parser, main
from streaminfer.server.config import AdmissionConfig, BatchingConfig, LimitsConfig, ModelConfig, ServerConfig
from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

# -- synthetic pages -------------------------------------------------------------

INTERVAL_S = 10.0


class PageWriter:
    """Writes a Prometheus text page of streaminfer metrics from totals."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def counter(self, name: str, value: float, **labels: str) -> None:
        self._lines.append(f"{name}{_labels(labels)} {value}")

    gauge = counter

    def histogram(self, name: str, bounds: tuple[float, ...], observations: list[tuple[float, int]], **labels: str) -> None:
        """``observations``: (value, how many times) pairs."""
        for bound in (*bounds, float("inf")):
            count = sum(times for value, times in observations if value <= bound)
            le = "+Inf" if bound == float("inf") else repr(bound)
            self._lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {count}")
        self._lines.append(f"{name}_sum{_labels(labels)} {sum(value * times for value, times in observations)}")
        self._lines.append(f"{name}_count{_labels(labels)} {sum(times for _, times in observations)}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{value}"' for key, value in labels.items()) + "}"


@dataclasses.dataclass
class Scenario:
    """What a server did in INTERVAL_S seconds, for one audio model ``m``; times in seconds."""

    chunks: int = 1000
    modality: str = "audio"
    decode_wait: float = 0.0002
    decode: float = 0.0005
    input_wait: float = 0.0
    queue_wait: float = 0.003
    inference: float = 0.004
    postprocess: float = 0.0002
    write: float = 0.0003
    between: float = 0.001  # event loop/network: latency not in any stage
    batches_full: int = 0
    batches_delay: int = 200
    batch_size: int = 5
    max_batch_size: int = 64
    instances: int = 1
    decode_threads: int = 2
    decode_busy_s: float = 0.5
    cores: int = 4
    cpu_s: float = 4.0
    loop_lag: float = 0.0003
    paused: int = 0
    active: int = 8
    busy_fraction: float = 0.0
    max_busy_fraction: float = 0.75
    busy_capacity: int = 0
    arrival_reserve: float = 0.0
    drops: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    rejections: dict[str, int] = dataclasses.field(default_factory=dict)
    ended: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def latency(self) -> float:
        stages = self.decode_wait + self.decode + self.input_wait + self.queue_wait + self.inference
        stages += self.postprocess + self.write
        return stages + self.between


def page(scenario: Scenario | None) -> str:
    """The page after ``scenario``; None gives the page of a server that has done nothing yet."""
    s = scenario or Scenario(chunks=0, batches_delay=0, decode_busy_s=0.0, cpu_s=0.0)
    idle = scenario is None
    batches = s.batches_full + s.batches_delay
    loop_ticks = 0 if idle else int(INTERVAL_S / (0.02 + s.loop_lag))
    writer = PageWriter()
    writer.counter("streaminfer_chunks_received_total", s.chunks, modality=s.modality)
    writer.counter("streaminfer_chunks_processed_total", s.chunks - sum(s.drops.values()), modality=s.modality)
    for (modality, reason), count in s.drops.items():
        writer.counter("streaminfer_chunks_dropped_total", count, modality=modality, reason=reason)
    for reason, count in s.rejections.items():
        writer.counter("streaminfer_streams_rejected_total", count, reason=reason)
    for reason, count in s.ended.items():
        writer.counter("streaminfer_streams_ended_by_server_total", count, reason=reason)
    writer.counter("streaminfer_streams_started_total", 0 if idle else 10)
    writer.gauge("streaminfer_streams_active", s.active)
    writer.gauge("streaminfer_streams_paused", s.paused)
    answered = s.chunks - sum(s.drops.values())
    latency = metrics.LATENCY_BUCKETS_S
    stage = metrics.STAGE_BUCKETS_S
    writer.histogram("streaminfer_chunk_latency_seconds", latency, [(s.latency, answered)], model="m", modality=s.modality)
    writer.histogram("streaminfer_decode_wait_seconds", stage, [(s.decode_wait, s.chunks)], modality=s.modality)
    writer.histogram("streaminfer_decode_seconds", stage, [(s.decode, s.chunks)], modality=s.modality)
    writer.histogram("streaminfer_input_wait_seconds", latency, [(s.input_wait, s.chunks)], model="m")
    writer.histogram("streaminfer_queue_wait_seconds", latency, [(s.queue_wait, s.chunks)], model="m")
    writer.histogram("streaminfer_inference_seconds", latency, [(s.inference, batches)], model="m")
    writer.histogram("streaminfer_postprocess_seconds", stage, [(s.postprocess, batches)], model="m")
    writer.histogram("streaminfer_write_seconds", latency, [(s.write, answered)])
    writer.histogram("streaminfer_batch_size", metrics.BATCH_SIZE_BUCKETS, [(s.batch_size, batches)], model="m")
    writer.histogram(
        "streaminfer_batch_fill_ratio", metrics.FILL_RATIO_BUCKETS, [(s.batch_size / s.max_batch_size, batches)], model="m"
    )
    writer.counter("streaminfer_batches_total", s.batches_full, model="m", reason="full")
    writer.counter("streaminfer_batches_total", s.batches_delay, model="m", reason="delay")
    writer.gauge("streaminfer_max_batch_size", s.max_batch_size, model="m")
    writer.gauge("streaminfer_model_instances", s.instances, model="m")
    writer.gauge("streaminfer_queue_depth", 0, model="m")
    writer.histogram("streaminfer_event_loop_lag_seconds", metrics.LOOP_LAG_BUCKETS_S, [(s.loop_lag, loop_ticks)])
    writer.counter("streaminfer_process_cpu_seconds_total", s.cpu_s)
    writer.gauge("streaminfer_cpu_cores", s.cores)
    writer.gauge("streaminfer_decode_threads", s.decode_threads)
    writer.counter("streaminfer_decode_busy_seconds_total", s.decode_busy_s)
    writer.gauge("streaminfer_decode_queue_depth", 0)
    writer.gauge("streaminfer_busy_fraction", s.busy_fraction)
    writer.gauge("streaminfer_max_busy_fraction", s.max_busy_fraction)
    writer.gauge("streaminfer_busy_capacity_streams", s.busy_capacity)
    writer.gauge("streaminfer_busy_arrival_reserve", s.arrival_reserve)
    return writer.text()


def report_on(scenario: Scenario | None) -> dict[str, Any]:
    snapshot = diagnose.Snapshot("http://127.0.0.1:9464/metrics", page(None), page(scenario), INTERVAL_S)
    return diagnose.diagnose(snapshot)


def test_synthetic_slow_model_asks_for_instances() -> None:
    # Batches of 5 of 64 take 45 ms each, 200 of them in 10 s: 0.9 s of inference per second.
    report = report_on(Scenario(queue_wait=0.04, inference=0.045, batches_delay=200))
    verdict = report["verdict"]
    assert verdict["kind"] == "model_instances"
    assert verdict["model"] == "m"
    assert "add model instances" in verdict["change"]
    (batch,) = report["batches"]
    assert batch["busy"] == pytest.approx((200 * 0.045 + 200 * 0.0002) / INTERVAL_S)
    assert batch["mean_batch_size"] == pytest.approx(5)
    assert batch["share_delay"] == 1.0
    assert report["latency"][0]["stages"][0]["stage"] == "inference"


def test_synthetic_batch_limit_asks_for_larger_batches() -> None:
    report = report_on(
        Scenario(queue_wait=0.08, inference=0.004, batch_size=1, max_batch_size=1, batches_full=1000, batches_delay=0)
    )
    verdict = report["verdict"]
    assert verdict["kind"] == "batch_size"
    assert "raise max_batch_size" in verdict["change"]
    (batch,) = report["batches"]
    assert batch["share_full"] == 1.0
    assert batch["mean_fill_ratio"] == pytest.approx(1.0)
    assert report["latency"][0]["stages"][0]["stage"] == "queue_wait"


def test_synthetic_starved_decode_pool_asks_for_decode_threads() -> None:
    report = report_on(Scenario(modality="video", decode_wait=0.12, decode=0.02, decode_threads=1, decode_busy_s=9.8))
    assert report["verdict"]["kind"] == "decode_threads"
    assert "add decode threads" in report["verdict"]["change"]
    assert report["saturation"]["decode_busy"] == pytest.approx(0.98)
    assert report["saturation"]["stages"][0]["stage"] == "decode threads"


def test_synthetic_starved_audio_decode_asks_for_workers() -> None:
    # Audio streams share one decode thread, so more threads would not help.
    report = report_on(Scenario(decode_wait=0.12, decode=0.02, decode_threads=2, decode_busy_s=9.8))
    assert report["verdict"]["kind"] == "workers"
    assert "decode thread of audio and text streams is starved" in report["verdict"]["line"]
    assert "add workers" in report["verdict"]["change"]


def test_synthetic_decode_on_every_core_asks_for_workers() -> None:
    report = report_on(Scenario(decode_wait=0.12, decode=0.02, decode_threads=4, cores=4, decode_busy_s=39.0, cpu_s=39.5))
    assert report["verdict"]["kind"] == "workers"
    assert "add workers" in report["verdict"]["change"]


def test_synthetic_busy_loop_verdict() -> None:
    # Chunks wait between stages while the loop's busy fraction is at its admission limit.
    report = report_on(Scenario(between=0.08, busy_fraction=0.9, max_busy_fraction=0.85))
    assert report["verdict"]["kind"] == "event_loop"
    assert "the event loop is near its limit: busy 90% of the second before the second scrape" in report["verdict"]["line"]
    assert "rejected" not in report["verdict"]["line"]
    # Streams rejected for load in the interval are counted in the verdict.
    report = report_on(Scenario(between=0.08, busy_fraction=0.9, max_busy_fraction=0.85, rejections={"busy": 40}))
    assert report["verdict"]["line"].endswith("; 40 streams rejected for load (busy 40), 80% of new streams")
    assert "add workers" in report["verdict"]["change"]
    # The same wait with the loop under its limit is not put on the loop's busy fraction.
    report = report_on(Scenario(between=0.08, busy_fraction=0.5, max_busy_fraction=0.85))
    assert "near its limit" not in report["verdict"]["line"]


def test_busy_stage_shows_capacity() -> None:
    report = report_on(Scenario(busy_fraction=0.8, max_busy_fraction=0.8, busy_capacity=186))
    assert report["saturation"]["busy_capacity_streams"] == 186
    (stage,) = [entry for entry in report["saturation"]["stages"] if entry["stage"] == "event loop busy fraction"]
    assert stage["detail"].endswith("at the cost per stream learned so far it allows 186 open streams")
    assert stage["detail"].startswith(
        "the loop busy instead of waiting for the network, the larger of its readings at the first and second "
        "scrape, 0% and 80%; "
    )
    # Before the cost is learned the gauge reads 0, and the detail leaves the count out.
    report = report_on(Scenario(busy_fraction=0.3, max_busy_fraction=0.8))
    (stage,) = [entry for entry in report["saturation"]["stages"] if entry["stage"] == "event loop busy fraction"]
    assert "allows" not in stage["detail"]
    assert "arriving" not in stage["detail"]
    # While streams arrive, the room kept for them follows the count.
    report = report_on(Scenario(busy_fraction=0.6, max_busy_fraction=0.8, busy_capacity=149, arrival_reserve=0.05))
    assert report["saturation"]["busy_arrival_reserve"] == 0.05
    (stage,) = [entry for entry in report["saturation"]["stages"] if entry["stage"] == "event loop busy fraction"]
    assert stage["detail"].endswith("allows 149 open streams; 0.050 of the loop kept for new streams arriving, so a burst stops sooner")


def test_synthetic_costly_frames_frame_rate() -> None:
    report = report_on(Scenario(modality="video", decode_wait=0.001, decode=0.09, decode_busy_s=4.0))
    assert report["verdict"]["kind"] == "frame_rate"
    assert "frame rate" in report["verdict"]["change"]


def test_synthetic_keep_latest_drops_frame_rate() -> None:
    report = report_on(Scenario(modality="video", drops={("video", "overflow"): 300}))
    assert report["verdict"]["kind"] == "frame_rate"
    assert "300 of 1000 frames (30%)" in report["verdict"]["line"]
    assert report["drops"] == [{"modality": "video", "reason": "overflow", "count": 300, "share": 0.3}]


def test_synthetic_blocked_event_loop_asks_for_workers() -> None:
    report = report_on(Scenario(between=0.06, write=0.01, loop_lag=0.04))
    assert report["verdict"]["kind"] == "event_loop"
    assert "add workers" in report["verdict"]["change"]
    assert report["saturation"]["loop_late_share"] > 0.6
    assert report["saturation"]["loop_lag_p99_s"] == pytest.approx(0.05, abs=0.011)


def test_synthetic_slow_clients_are_named() -> None:
    report = report_on(Scenario(write=0.4, between=0.2, paused=3, ended={"write_timeout": 2}))
    verdict = report["verdict"]
    assert verdict["kind"] == "slow_clients"
    assert "clients read too slowly" in verdict["line"]
    assert "3 streams paused" in verdict["line"]
    assert "2 ended by write timeout" in verdict["line"]


def test_synthetic_input_wait_named() -> None:
    # 48 kHz audio in 32 ms chunks: each chunk's last window completes with the next chunk.
    report = report_on(Scenario(input_wait=0.032, cpu_s=0.2, decode_busy_s=0.05))
    verdict = report["verdict"]
    assert verdict["kind"] == "input_wait"
    assert "chunks wait for later input: 32.0 ms" in verdict["line"]
    assert "16 kHz" in verdict["change"]
    stages = {stage["stage"]: stage["mean_s"] for stage in report["latency"][0]["stages"]}
    assert stages["input_wait"] == pytest.approx(0.032, rel=0.01)
    assert stages["event_loop_network"] == pytest.approx(0.001, rel=0.05)
    # The stage rows line up, the longest name included: every share ends in the same column.
    rows = [line for line in diagnose.render(report).splitlines() if line.startswith("    ") and line.endswith("%")]
    assert any("waiting for more input" in row for row in rows)
    assert len({len(row) for row in rows}) == 1


def test_synthetic_healthy_server_has_no_bottleneck() -> None:
    report = report_on(Scenario())
    assert report["verdict"]["kind"] == "none"
    assert "no bottleneck" in report["verdict"]["line"]


def test_synthetic_idle_server_says_no_traffic() -> None:
    report = diagnose.diagnose(diagnose.Snapshot("u", page(None), page(None), INTERVAL_S))
    assert report["idle"] is True
    assert report["verdict"]["kind"] == "idle"
    text = diagnose.render(report)
    assert "no traffic" in text
    assert "10.0 s between scrapes" in text


def test_synthetic_rejections_and_drops_are_counted_and_ranked() -> None:
    report = report_on(
        Scenario(
            drops={("audio", "deadline"): 50, ("audio", "overflow"): 10},
            rejections={"max_streams": 30, "rate_limit": 5},
        )
    )
    assert [(d["reason"], d["count"]) for d in report["drops"]] == [("deadline", 50), ("overflow", 10)]
    assert report["drops"][0]["share"] == pytest.approx(0.05)
    assert [(r["reason"], r["count"]) for r in report["rejections"]] == [("max_streams", 30), ("rate_limit", 5)]
    # 10 streams started: 30 rejections are 30 of 40 streams opened.
    assert report["rejections"][0]["share"] == pytest.approx(0.75)
    impacts = [finding["impact"] for finding in report["findings"]]
    assert impacts == sorted(impacts, reverse=True)
    assert "30 streams rejected (max_streams), 75% of new streams" in report["findings"][0]["text"]
    text = diagnose.render(report)
    assert "max_streams: 30 (75% of new streams, admitted or rejected)" in text
    assert "audio deadline: 50 (5% of chunks read)" in text


def test_synthetic_busy_fraction_is_a_finding() -> None:
    report = report_on(Scenario(busy_fraction=0.81, rejections={"busy": 40}))
    assert report["saturation"]["busy_fraction"] == pytest.approx(0.81)
    texts = [finding["text"] for finding in report["findings"]]
    assert any(
        "event loop busy fraction 81% busy (the loop busy instead of waiting for the network, the larger of its "
        "readings at the first and second scrape, 0% and 81%; admission.max_busy_fraction 0.75)" in text
        for text in texts
    )
    assert any("40 streams rejected (busy)" in text for text in texts)
    # Without the check both gauges read 0 and there is no finding.
    quiet = report_on(Scenario(max_busy_fraction=0.0))
    assert not any("busy fraction" in finding["text"] for finding in quiet["findings"])
    assert "event loop busy fraction        -  not measured: admission.max_busy_fraction is 0" in diagnose.render(quiet)


def test_rejecting_for_load_is_capacity() -> None:
    # Chunks acked in 9 ms while the busy-fraction check rejects streams: admission keeps the latency low.
    report = report_on(Scenario(busy_fraction=0.78, max_busy_fraction=0.8, rejections={"busy": 40}))
    verdict = report["verdict"]
    assert verdict["kind"] == "capacity"
    assert verdict["line"].startswith("the server is at its admission limit and keeps its latency: 40 streams rejected")
    assert "(busy 40), 80% of new streams, while m answers in" in verdict["line"]
    assert "add workers" in verdict["change"]
    # The same latency with no rejection: no bottleneck.
    assert report_on(Scenario(busy_fraction=0.3, max_busy_fraction=0.8))["verdict"]["kind"] == "none"
    # A rate limit is the client's quota, not load.
    assert report_on(Scenario(busy_fraction=0.3, rejections={"rate_limit": 40}))["verdict"]["kind"] != "capacity"


# One scenario per verdict, each with 280 streams rejected for load (busy) besides the 10 started.
VERDICTS_WITH_REJECTIONS = {
    "model_speed": Scenario(queue_wait=0.005, inference=0.02),
    "model_instances": Scenario(queue_wait=0.04, inference=0.045),
    "batch_size": Scenario(queue_wait=0.08, batch_size=1, max_batch_size=1, batches_full=1000, batches_delay=0),
    "decode_threads": Scenario(modality="video", decode_wait=0.12, decode=0.02, decode_threads=1, decode_busy_s=9.8),
    "frame_rate": Scenario(modality="video", drops={("video", "overflow"): 300}),
    "event_loop": Scenario(between=0.06, write=0.01, loop_lag=0.04),
    "slow_clients": Scenario(write=0.4, between=0.2, paused=3),
    "input_wait": Scenario(input_wait=0.032),
    "capacity": Scenario(),
    "workers": Scenario(chunks=0, batches_delay=0),
}


@pytest.mark.parametrize("kind", sorted(VERDICTS_WITH_REJECTIONS))
def test_every_verdict_names_load_rejections_once(kind: str) -> None:
    scenario = dataclasses.replace(VERDICTS_WITH_REJECTIONS[kind], rejections={"busy": 280})
    verdict = report_on(scenario)["verdict"]
    assert verdict["kind"] == kind
    assert verdict["line"].count("streams rejected for load") == 1
    assert "280 streams rejected for load (busy 280), 97% of new streams" in verdict["line"]
    # Without rejections the same verdict does not mention them.
    if kind not in ("capacity", "workers"):
        quiet = report_on(VERDICTS_WITH_REJECTIONS[kind])["verdict"]
        assert quiet["kind"] == kind
        assert "rejected" not in quiet["line"]


def test_slow_model_verdict_names_rejections() -> None:
    verdict = report_on(dataclasses.replace(VERDICTS_WITH_REJECTIONS["model_speed"], rejections={"busy": 280}))["verdict"]
    assert verdict["line"].startswith("the model itself is slow: queue wait 5.0 ms + inference 20.0 ms are ")
    assert verdict["line"].endswith("; 280 streams rejected for load (busy 280), 97% of new streams")


def test_rejections_without_chunks_are_not_idle() -> None:
    report = report_on(Scenario(chunks=0, batches_delay=0, rejections={"max_streams": 30}))
    assert report["idle"] is False
    assert report["verdict"]["line"] == "no chunk answered in the interval; 30 streams rejected for load (max_streams 30), 75% of new streams"
    assert "add workers" in report["verdict"]["change"]


def test_draining_is_shutting_down_not_load() -> None:
    # A healthy server that rejects streams while it shuts down is not at its admission limit.
    report = report_on(Scenario(rejections={"draining": 40}, ended={"draining": 3}))
    assert report["verdict"]["kind"] == "none"
    assert "rejected" not in report["verdict"]["line"]
    assert any(
        "40 streams rejected because the server was shutting down (draining), 80% of new streams" in finding["text"]
        for finding in report["findings"]
    )
    text = diagnose.render(report)
    assert "  draining (the server was shutting down): 40 (80% of new streams, admitted or rejected)" in text
    assert "  draining (the server was shutting down): 3\n" in text
    assert "for load" not in text
    # Next to rejections for load, only those are counted as load.
    report = report_on(Scenario(between=0.08, busy_fraction=0.3, rejections={"draining": 40, "busy": 8}))
    assert report["verdict"]["line"].endswith("; 8 streams rejected for load (busy 8), 44% of new streams")
    # Draining alone with no chunk read: nothing to diagnose, as with no traffic.
    assert report_on(Scenario(chunks=0, batches_delay=0, rejections={"draining": 40}))["idle"] is True


def test_busy_fraction_larger_of_scrapes() -> None:
    # The load ran at the first scrape and ended before the second: the gauge reads 0 at the second,
    # while every new stream in the window was rejected (busy).
    during = page(Scenario(chunks=0, batches_delay=0, decode_busy_s=0.0, cpu_s=0.0, busy_fraction=0.81))
    after = page(Scenario(queue_wait=0.005, inference=0.02, busy_fraction=0.0, rejections={"busy": 280}))
    report = diagnose.diagnose(diagnose.Snapshot("u", during, after, INTERVAL_S))
    saturation = report["saturation"]
    assert saturation["busy_fraction"] == pytest.approx(0.81)
    assert saturation["busy_fraction_scrape"] == "first"
    assert saturation["busy_fraction_by_scrape"] == [pytest.approx(0.81), 0.0]
    (row,) = [line for line in diagnose.render(report).splitlines() if line.startswith("  event loop busy fraction")]
    assert " 81%  the loop busy instead of waiting for the network, the larger of its readings at the first and " in row
    assert "second scrape, 81% and 0%; " in row
    assert any(finding["text"].startswith("event loop busy fraction 81% busy") for finding in report["findings"])
    assert report["verdict"]["kind"] == "model_speed"
    assert report["verdict"]["line"].endswith("; 280 streams rejected for load (busy 280), 100% of new streams")
    # A verdict on the loop names the scrape its busy fraction comes from.
    during = page(Scenario(chunks=0, batches_delay=0, decode_busy_s=0.0, cpu_s=0.0, busy_fraction=0.72, max_busy_fraction=0.8))
    after = page(dataclasses.replace(OVERLOADED, busy_fraction=0.0))
    report = diagnose.diagnose(diagnose.Snapshot("u", during, after, INTERVAL_S))
    assert report["verdict"]["line"].startswith(
        "the event loop is close to its limit: busy 72% of the second before the first scrape against "
        "admission.max_busy_fraction 0.8; "
    )
    # Equal readings are put on the second scrape.
    report = report_on(Scenario(busy_fraction=0.0))
    assert report["saturation"]["busy_fraction_scrape"] == "second"


# An overloaded audio server: admission rejects 8 of 18 new streams (44 %) for load, the model's one
# instance is 78 % busy and the loop's busy fraction is 0.72 against its 0.8 limit. Event loop/network
# is 14.9 ms of 42.6 ms (35 %), write 6.4 ms (15 %), and the two together the largest group (50 %).
OVERLOADED = Scenario(
    chunks=8000,
    decode_wait=0.0005,
    decode=0.0016,
    queue_wait=0.012,
    inference=0.0068,
    postprocess=0.0004,
    write=0.0064,
    between=0.0149,
    batches_delay=1083,
    batch_size=7,
    cpu_s=20.0,
    busy_fraction=0.72,
    max_busy_fraction=0.8,
    rejections={"busy": 8},
)


def breakdown_shares(report: dict[str, Any]) -> dict[str, str]:
    """Return each stage's share as the rendered latency breakdown prints it, by stage name."""
    rows = {}
    for line in diagnose.render(report).splitlines():
        for name in diagnose.STAGE_NAMES.values():
            if line.startswith(f"    {name}  "):
                rows[name] = line.split()[-1]
    return rows


def test_loop_near_limit_with_rejections() -> None:
    report = report_on(OVERLOADED)
    verdict = report["verdict"]
    assert verdict["kind"] == "event_loop"
    line = verdict["line"]
    assert line.startswith(
        "the event loop is close to its limit: busy 72% of the second before the second scrape against admission.max_busy_fraction 0.8; "
    )
    # Each share named is the one the breakdown shows for that stage, not the sum of the two.
    shares = breakdown_shares(report)
    assert shares["event loop/network"] == "35%"
    assert shares["write"] == "15%"
    assert "chunks wait between stages: event loop/network 14.9 ms (35%) and write 6.4 ms (15%) of m (audio)" in line
    assert "50% of" not in line
    # The busy stages are named with their figures, and nothing is called unsaturated.
    assert "; other busy stages: model m instances 78% busy, process CPU 50% busy;" in line
    assert "saturated" not in line
    # The streams rejected for load, as the capacity verdict words them.
    assert line.endswith("; 8 streams rejected for load (busy 8), 44% of new streams")
    assert verdict["change"] == (
        "add workers (serve --workers N) or replicas: each process has one event loop, and admission rejects new "
        "streams (busy) as it reaches its limit"
    )
    assert "network" not in verdict["change"]
    assert "BOTTLENECK: the event loop is close to its limit" in diagnose.render(report)


def test_loop_near_limit_without_rejections() -> None:
    report = report_on(dataclasses.replace(OVERLOADED, rejections={}))
    verdict = report["verdict"]
    assert verdict["kind"] == "event_loop"
    assert verdict["line"].startswith("the event loop is close to its limit: busy 72%")
    assert "rejected" not in verdict["line"]
    assert verdict["change"] == "add workers (serve --workers N) or replicas: each process has one event loop"


def test_stage_wait_names_busiest_stages() -> None:
    # The same load with the loop well under its limit: the wait is not put on the loop's busy fraction,
    # the busiest stages are named with their figures, and the network advice is conditional.
    report = report_on(dataclasses.replace(OVERLOADED, busy_fraction=0.5))
    verdict = report["verdict"]
    assert verdict["kind"] == "event_loop"
    assert verdict["line"] == (
        "chunks wait between stages: event loop/network 14.9 ms (35%) and write 6.4 ms (15%) of m (audio): mean "
        f"chunk latency 42.6 ms, p99 {diagnose._ms(report['latency'][0]['p99_s'])}; the busiest stages: model m "
        "instances 78% busy, event loop busy 50% of the second before the second scrape against admission.max_busy_fraction 0.8, "
        "process CPU 50% busy; 8 streams rejected for load (busy 8), 44% of new streams"
    )
    assert verdict["change"] == (
        "add workers (serve --workers N) or replicas; if clients connect over a network rather than loopback, "
        "check the network between them and the server"
    )
    # Rejections that are not for load (a client's quota) are left out of the verdict.
    report = report_on(dataclasses.replace(OVERLOADED, busy_fraction=0.5, rejections={"rate_limit": 8}))
    assert "rejected" not in report["verdict"]["line"]


def test_stage_wait_nothing_busy() -> None:
    report = report_on(Scenario(between=0.08, busy_fraction=0.3))
    verdict = report["verdict"]
    assert verdict["kind"] == "event_loop"
    assert "chunks wait between stages: event loop/network 80.0 ms (91%) of m (audio)" in verdict["line"]
    # Write is under 1 % of the latency: left out.
    assert "write" not in verdict["line"]
    assert verdict["line"].endswith("; no stage is over 50% busy")
    assert breakdown_shares(report)["event loop/network"] == "91%"


def test_full_cpu_wait_shares() -> None:
    report = report_on(dataclasses.replace(OVERLOADED, busy_fraction=0.3, cpu_s=38.0))
    verdict = report["verdict"]
    assert verdict["kind"] == "workers"
    assert verdict["line"].startswith(
        "the process uses 95% of 4 cores and chunks wait between stages: event loop/network 14.9 ms (35%) and "
        "write 6.4 ms (15%) of m (audio)"
    )
    assert verdict["change"] == "add workers (serve --workers N) or replicas on more cores"


def test_latency_breakdown_adds_up() -> None:
    scenario = Scenario(decode_wait=0.002, decode=0.003, queue_wait=0.010, inference=0.020, postprocess=0.001, write=0.004, between=0.008)
    report = report_on(scenario)
    (entry,) = report["latency"]
    means = {stage["stage"]: stage["mean_s"] for stage in entry["stages"]}
    assert entry["mean_s"] == pytest.approx(0.048)
    assert means["event_loop_network"] == pytest.approx(0.008)
    assert means["inference"] == pytest.approx(0.020)
    assert sum(stage["share"] for stage in entry["stages"]) == pytest.approx(1.0)
    assert [stage["stage"] for stage in entry["stages"]][:3] == ["inference", "queue_wait", "event_loop_network"]
    # Every chunk took 48 ms, in the (35, 50] ms bucket: p50 and p99 fall inside it.
    assert 0.035 < entry["p50_s"] <= 0.05
    assert 0.035 < entry["p99_s"] <= 0.05


def test_quantiles_interpolate_inside_buckets() -> None:
    histogram = diagnose.Histogram(((0.01, 50.0), (0.02, 90.0), (0.05, 100.0), (float("inf"), 100.0)), 1.5, 100.0)
    assert histogram.quantile(0.5)[0] == pytest.approx(0.01)
    assert histogram.quantile(0.7)[0] == pytest.approx(0.015)
    assert histogram.quantile(0.99)[0] == pytest.approx(0.047)
    over = diagnose.Histogram(((0.01, 1.0), (float("inf"), 100.0)), 500.0, 100.0)
    assert over.quantile(0.99) == (0.01, True)
    assert diagnose.Histogram((), 0.0, 0.0).quantile(0.5) == (None, False)


def test_counter_reset_is_noted() -> None:
    snapshot = diagnose.Snapshot("u", page(Scenario(chunks=5000, batches_delay=900)), page(Scenario()), INTERVAL_S)
    report = diagnose.diagnose(snapshot)
    assert report["server_restarted"] is True
    assert report["traffic"]["chunks_received"] == 1000
    assert "the server restarted" in diagnose.render(report)


def test_every_metric_read_is_exported() -> None:
    exported = set(metrics.exported_names())
    for name in diagnose.READ_METRICS:
        assert name in exported or f"{name}_count" in exported, name


def test_page_that_is_not_streaminfer_is_refused() -> None:
    with pytest.raises(diagnose.DiagnoseError, match=r"http://127.0.0.1:1/x is not a streaminfer metrics page: it has no"):
        diagnose.Page("process_cpu_seconds_total 3.0\n", "http://127.0.0.1:1/x")
    with pytest.raises(diagnose.DiagnoseError, match="not a streaminfer metrics page: it does not parse"):
        diagnose.Page("<html><body>hello</body></html>\n", "http://127.0.0.1:1/x")


# -- the command ------------------------------------------------------------------


class _Pages(http.server.BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_GET(self) -> None:  # noqa: N802 (the handler's name)
        body = self.bodies[min(self.server.served, len(self.bodies) - 1)]  # type: ignore[attr-defined]
        self.server.served += 1  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def page_server(*bodies: str) -> Iterator[str]:
    """Serve ``bodies`` in turn on a loopback port (the last one again and again); yield the URL."""
    handler = type("Pages", (_Pages,), {"bodies": [body.encode() for body in bodies]})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    server.served = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    options = build_parser().parse_args(["diagnose", *argv])
    return diagnose.run(options, out, err), out.getvalue(), err.getvalue()


def test_cli_scrapes_saves_and_reports_from_snapshot(tmp_path: pathlib.Path) -> None:
    saved = tmp_path / "scrapes.json"
    # The scrapes are 0.3 s apart, not INTERVAL_S: with no loop lag the rates only grow, capped at 100 % busy.
    with page_server(page(None), page(Scenario(queue_wait=0.04, inference=0.045, loop_lag=0.0))) as url:
        status, out, err = run_cli(["--url", url, "--interval", "0.3", "--save", str(saved)])
    assert status == 0, err
    assert f"first scrape of {url} done; waiting 0.3 s for the second" in err
    assert re.search(r"second scrape done, \d+\.\d s after the first", err)
    assert "BOTTLENECK: the model is saturated" in out
    assert "add model instances" in out
    assert "Where the latency goes" in out
    assert "Saturation (busiest first)" in out

    stored = json.loads(saved.read_text())
    assert stored["format"] == diagnose.SNAPSHOT_FORMAT
    assert stored["url"] == url
    assert len(stored["scrapes"]) == 2
    assert 0.25 <= stored["interval_s"] < 5.0

    status, out, err = run_cli(["--snapshot", str(saved), "--json"])
    assert status == 0, err
    report = json.loads(out)
    assert report["verdict"]["kind"] == "model_instances"
    assert report["url"] == url
    assert report["traffic"]["chunks_received"] == 1000


def test_progress_names_each_scrape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diagnose, "PROGRESS_EVERY_S", 0.1)
    lines: list[str] = []
    with page_server(page(None), page(Scenario())) as url:
        diagnose.take_snapshot(url, 0.35, lines.append)
    assert re.fullmatch(rf"streaminfer diagnose: first scrape of {re.escape(url)} done; waiting 0\.\d s for the second", lines[0])
    waits = lines[1:-1]
    assert waits
    assert all(re.fullmatch(r"streaminfer diagnose: waiting 0\.\d s more for the second scrape", line) for line in waits)
    assert re.fullmatch(r"streaminfer diagnose: second scrape done, \d+\.\d s after the first", lines[-1])


def test_cli_names_the_url_of_a_foreign_page() -> None:
    with page_server("# HELP up Up.\n# TYPE up gauge\nup 1\n") as url:
        status, out, err = run_cli(["--url", url, "--interval", "0.1"])
    assert status == 1
    assert out == ""
    assert f"{url} is not a streaminfer metrics page" in err
    # The page is rejected after the first scrape, before the wait.
    assert "waiting" not in err


def test_cli_errors_are_clear(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other"}')
    status, _, err = run_cli(["--snapshot", str(bad)])
    assert status == 1
    assert f"{bad} is not a diagnose snapshot" in err
    status, _, err = run_cli(["--snapshot", str(tmp_path / "missing.json")])
    assert status == 1
    assert "cannot read snapshot" in err
    status, _, err = run_cli(["--url", "ftp://127.0.0.1/metrics"])
    assert status == 1
    assert "expected an http:// or https:// URL" in err
    status, _, err = run_cli(["--interval", "0", "--url", "http://127.0.0.1:1/metrics"])
    assert status == 1
    assert "--interval 0.0 is invalid" in err
    # Port 1 on loopback: nothing listens there.
    status, _, err = run_cli(["--url", "http://127.0.0.1:1/metrics", "--interval", "0.1"])
    assert status == 1
    assert "cannot read http://127.0.0.1:1/metrics" in err


def test_cli_help_and_default_url(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["diagnose", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default: http://127.0.0.1:9464/metrics" in help_text
    assert "default: 5" in help_text
    assert "times in ms" in help_text
    assert "--json" in help_text
    options = build_parser().parse_args(["diagnose"])
    assert options.url == diagnose.DEFAULT_URL
    assert options.interval == diagnose.DEFAULT_INTERVAL_S


# -- induced bottlenecks on a real server -----------------------------------------

WARM_UP_S = 1.0
MEASURE_S = 2.5
# No load thread runs longer than this, whatever happens.
LOAD_LIMIT_S = 30.0
WINDOW_48K = 1536  # 32 ms at 48 kHz: one audio chunk is one model window
SPEECH = MEDIA / "audio" / "speech_sample.wav"
SMALL_WINDOWS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)]


@contextlib.contextmanager
def serving(config: ServerConfig) -> Iterator[ServerThread]:
    """Run ``config`` on loopback with admission by queue wait off, so that every load stream is admitted."""
    config = dataclasses.replace(config, admission=AdmissionConfig(max_queue_wait_ms=0, max_busy_fraction=0))
    thread = ServerThread(loopback_config(config)).start()
    try:
        yield thread
    finally:
        thread.stop()


def metrics_url(thread: ServerThread) -> str:
    assert thread.server is not None and thread.server.metrics_port
    return f"http://127.0.0.1:{thread.server.metrics_port}/metrics"


class Load:
    """Client threads that drive streams until stopped, each bounded in time and in messages."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.responses = 0
        self._threads: list[threading.Thread] = []

    def start(self, target: Callable[..., None], *args: Any) -> None:
        def guarded() -> None:
            try:
                target(self, *args)
            except grpc.RpcError as error:
                if not self.stop.is_set():
                    self.errors.append(error)
            except BaseException as error:  # reported by the test
                self.errors.append(error)

        thread = threading.Thread(target=guarded, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=LOAD_LIMIT_S)
        assert not any(thread.is_alive() for thread in self._threads), "a load thread did not stop"


def stream(
    load: Load,
    target: str,
    config: pb.StreamConfig,
    chunks: list[pb.StreamRequest],
    pace_s: float = 0.0,
    read_pause_s: float = 0.0,
    options: list[tuple[str, int]] | None = None,
) -> None:
    """One stream: send ``chunks`` over and over (renumbered) every ``pace_s``; read with ``read_pause_s`` between reads."""
    started = time.monotonic()

    def requests() -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(config=config)
        for sequence_number in range(100_000):
            if load.stop.is_set() or time.monotonic() - started > LOAD_LIMIT_S:
                return
            request = pb.StreamRequest()
            request.CopyFrom(chunks[sequence_number % len(chunks)])
            field = request.WhichOneof("request")
            getattr(request, field).sequence_number = sequence_number
            yield request
            if pace_s:
                time.sleep(pace_s)

    with grpc.insecure_channel(target, options=options) as channel:
        call = pb_grpc.InferenceServiceStub(channel).Stream(requests(), timeout=LOAD_LIMIT_S + 10)
        try:
            for _ in call:
                load.responses += 1
                if read_pause_s and not load.stop.is_set():
                    load.stop.wait(read_pause_s)
        finally:
            call.cancel()


def audio_chunks() -> tuple[list[pb.StreamRequest], int]:
    samples, rate = read_wav(SPEECH)
    assert rate == 48_000
    step = WINDOW_48K
    return [
        pb.StreamRequest(audio=pb.AudioChunk(audio_content=samples[offset : offset + step].tobytes()))
        for offset in range(0, len(samples) - step, step)
    ], rate


def audio_config(model: str, rate: int) -> pb.StreamConfig:
    return pb.StreamConfig(
        models=[pb.ModelSelection(model=model)],
        audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=rate),
    )


def measure(thread: ServerThread, load: Load) -> dict[str, Any]:
    """Let the load settle, then diagnose the server over MEASURE_S seconds."""
    load.stop.wait(WARM_UP_S)
    snapshot = diagnose.take_snapshot(metrics_url(thread), MEASURE_S)
    report = diagnose.diagnose(snapshot)
    print(diagnose.render(report))
    return report


def model_entry(report: dict[str, Any], model: str) -> dict[str, Any]:
    return next(entry for entry in report["latency"] if entry["model"] == model)


def groups(entry: dict[str, Any]) -> dict[str, float]:
    means = {stage["stage"]: stage["mean_s"] for stage in entry["stages"]}
    return {
        "decode": means["decode_wait"] + means["decode"],
        "model": means["queue_wait"] + means["inference"] + means["postprocess"],
        "write": means["write"],
        "between": means["event_loop_network"],
    }


def busy_of(report: dict[str, Any], stage: str) -> float:
    return next(entry["busy"] for entry in report["saturation"]["stages"] if entry["stage"] == stage)


def induce(
    config: ServerConfig, streams: int, *stream_args: Any, loop_block: tuple[float, float] | None = None
) -> dict[str, Any]:
    """Serve ``config`` under ``streams`` copies of ``stream(target, *stream_args)`` and return the diagnose report.

    ``loop_block``, (block_s, every_s), also puts a block_s sleep on the server's event loop every every_s.
    """
    load = Load()
    with serving(config) as thread:
        try:
            for _ in range(streams):
                load.start(stream, thread.target, *stream_args)
            if loop_block is not None:
                load.start(block_loop, thread, *loop_block)
            report = measure(thread, load)
        finally:
            load.close()
    assert not load.errors, load.errors
    return report


class FixedCost(torch.nn.Module):
    """A model whose every batch costs ``rounds`` matrix products, whatever its size."""

    def __init__(self, rounds: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("weight", torch.randn(256, 256, generator=generator) / 16.0)
        self.rounds = rounds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.weight
        for _ in range(self.rounds):
            z = torch.tanh(z @ self.weight)
        return x.reshape(x.shape[0], -1)[:, :4] + z.mean()


class Wide(torch.nn.Module):
    """A cheap model with a large output: 8 copies of its window, 48 KiB per item."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).repeat(1, 8)


def fixed_cost_rounds(target_s: float) -> int:
    """Rounds of FixedCost that take about ``target_s`` on this machine, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probe = FixedCost(20)
        probe(torch.zeros(1, 1, WINDOW_48K))
        started = time.perf_counter()
        probe(torch.zeros(1, 1, WINDOW_48K))
        per_round = (time.perf_counter() - started) / 20
    finally:
        torch.set_num_threads(threads)
    return max(20, min(5000, round(target_s / max(per_round, 1e-6))))


@pytest.fixture(scope="module")
def user_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("diagnose_models")
    paths = {}
    for name, module in (("fixed_cost", FixedCost(fixed_cost_rounds(0.06))), ("wide", Wide())):
        path = folder / f"{name}.pt"
        torch.jit.script(module.eval()).save(str(path))
        paths[name] = str(path)
    return paths


def user_model(name: str, path: str, **batching: Any) -> ModelConfig:
    return ModelConfig(
        name=name, kind="torchscript", modality="audio", path=path, input_shape=(1, WINDOW_48K),
        batching=BatchingConfig(**batching),
    )


def test_induced_slow_model(user_models: dict[str, str]) -> None:
    config = ServerConfig(models=(user_model("slow_model", user_models["fixed_cost"]),), torch_threads=1)
    chunks, rate = audio_chunks()
    report = induce(config, 3, audio_config("slow_model", rate), chunks, 0.032)
    verdict = report["verdict"]
    assert verdict["kind"] == "model_instances", verdict
    assert verdict["model"] == "slow_model"
    shares = groups(model_entry(report, "slow_model"))
    assert shares["model"] > 3 * shares["decode"]
    assert shares["model"] > 3 * shares["write"]
    assert shares["model"] > 2 * shares["between"]
    assert busy_of(report, "model slow_model instances") > busy_of(report, "decode threads")


def test_induced_batch_limit_of_one() -> None:
    base = next(model for model in loopback_config().models if model.kind == "silero_vad")
    vad = dataclasses.replace(base, name="vad_one", batching=BatchingConfig(max_batch_size=1))
    chunks, rate = audio_chunks()
    report = induce(ServerConfig(models=(vad,), torch_threads=1), 8, audio_config("vad_one", rate), chunks)
    verdict = report["verdict"]
    assert verdict["kind"] == "batch_size", verdict
    assert verdict["model"] == "vad_one"
    (batch,) = [entry for entry in report["batches"] if entry["model"] == "vad_one"]
    assert batch["share_full"] == 1.0
    assert batch["mean_batch_size"] == pytest.approx(1.0)
    entry = model_entry(report, "vad_one")
    assert diagnose._stage(entry, "queue_wait") > 3 * diagnose._stage(entry, "inference")
    shares = groups(entry)
    assert shares["model"] > 2 * max(shares["decode"], shares["write"], shares["between"])


def test_induced_starved_decode_pool() -> None:
    frames = video_frames(MEDIA / "video" / "vtest.avi", range(4))
    large = [jpeg(cv2_resize(frame, 3)) for frame in frames]
    noop = ModelConfig(name="frames_noop", kind="noop", modality="video")
    config = ServerConfig(models=(noop,), decode_threads=1)
    stream_config = pb.StreamConfig(
        models=[pb.ModelSelection(model="frames_noop")],
        video_format=pb.VideoFormat(encoding=pb.IMAGE_ENCODING_JPEG),
        video_overflow_policy=pb.OVERFLOW_POLICY_BACKPRESSURE,
    )
    requests = [pb.StreamRequest(frame=pb.VideoFrame(image_content=content)) for content in large]
    report = induce(config, 3, stream_config, requests)
    verdict = report["verdict"]
    assert verdict["kind"] == "decode_threads", verdict
    entry = model_entry(report, "frames_noop")
    assert diagnose._stage(entry, "decode_wait") > diagnose._stage(entry, "decode")
    shares = groups(entry)
    assert shares["decode"] > 2 * max(shares["model"], shares["write"], shares["between"])
    assert report["saturation"]["decode_busy"] > busy_of(report, "model frames_noop instances")


def cv2_resize(image: np.ndarray, factor: int) -> np.ndarray:
    import cv2

    height, width = image.shape[:2]
    return cv2.resize(image, (width * factor, height * factor), interpolation=cv2.INTER_CUBIC)


def block_loop(load: Load, thread: ServerThread, block_s: float, every_s: float) -> None:
    """Put a ``block_s`` sleep on the server's event loop every ``every_s`` until the load stops."""
    assert thread.loop is not None
    started = time.monotonic()
    while not load.stop.is_set() and time.monotonic() - started < LOAD_LIMIT_S:
        thread.loop.call_soon_threadsafe(time.sleep, block_s)
        load.stop.wait(every_s)


def test_induced_blocked_event_loop() -> None:
    noop = ModelConfig(name="loop_noop", kind="noop", modality="audio")
    chunks, rate = audio_chunks()
    report = induce(
        ServerConfig(models=(noop,)), 3, audio_config("loop_noop", rate), chunks, 0.032, loop_block=(0.045, 0.05)
    )
    verdict = report["verdict"]
    assert verdict["kind"] == "event_loop", verdict
    saturation = report["saturation"]
    assert saturation["loop_late_share"] > 0.3
    assert saturation["loop_late_share"] > 2 * busy_of(report, "model loop_noop instances")
    assert saturation["loop_late_share"] > 2 * saturation["decode_busy"]
    shares = groups(model_entry(report, "loop_noop"))
    assert shares["write"] + shares["between"] > 2 * max(shares["model"], shares["decode"])


def test_induced_slow_clients(user_models: dict[str, str]) -> None:
    config = ServerConfig(
        models=(user_model("wide_out", user_models["wide"]),), limits=LimitsConfig(max_chunks_in_flight=16)
    )
    chunks, rate = audio_chunks()
    report = induce(config, 2, audio_config("wide_out", rate), chunks, 0.01, 0.4, SMALL_WINDOWS)
    verdict = report["verdict"]
    assert verdict["kind"] == "slow_clients", verdict
    # streams_paused is a level sampled once a second, and a stream whose
    # client reads every 0.4 s is paused only part of the time: not asserted.
    assert "clients read too slowly: writing a response takes" in verdict["line"]
    shares = groups(model_entry(report, "wide_out"))
    assert shares["write"] > 3 * max(shares["model"], shares["decode"])
    assert report["saturation"]["loop_late_share"] < diagnose.LOOP_LATE_SHARE


def test_fetch_grpc_port_hint(server) -> None:
    with pytest.raises(diagnose.DiagnoseError, match="is this the gRPC port"):
        diagnose.fetch(f"http://{server.target}/metrics", timeout=10)


def test_rejecting_with_model_under_half_is_capacity() -> None:
    # Chunks take 22 ms, the model 10.4 ms of it (under half) with its instance half busy, while
    # admission rejects streams for load: the admission limit stops more streams, not the model.
    scenario = Scenario(queue_wait=0.004, inference=0.0064, write=0.004, between=0.0065, rejections={"busy": 138})
    verdict = report_on(scenario)["verdict"]
    assert scenario.latency > diagnose.HEALTHY_LATENCY_S
    assert verdict["kind"] == "capacity"
    assert verdict["line"].startswith("the server is at its admission limit and keeps its latency: 138 streams rejected")
    # With the model over half of the latency, the model verdict stands.
    slow = dataclasses.replace(scenario, inference=0.02)
    assert report_on(slow)["verdict"]["kind"] == "model_speed"
