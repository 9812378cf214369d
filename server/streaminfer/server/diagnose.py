"""``streaminfer diagnose``: where a running server's chunk latency goes, and what to change.

It reads the server's Prometheus page twice, INTERVAL seconds apart, and
reports on what happened between the two reads:

- latency per model: the mean time a chunk spends in each measured stage
  (decode wait, decode, waiting for more input, queue wait, inference,
  postprocess, write). The rest
  of the measured chunk latency counts as event loop/network. p50 and p99
  are estimated from the histogram buckets;
- batches per model: mean size against max_batch_size, fill ratio, and the
  share closed by delay or full;
- saturation: model instances (inference and postprocess seconds per second
  over instances), decode threads (busy seconds per second over threads),
  the event loop (how late its 20 ms timer ran, and its busy fraction
  against admission.max_busy_fraction while that check is on, the larger of
  its readings at the two scrapes) and process CPU over cores;
- drops and rejections by reason;
- one verdict naming the bottleneck and the change that would help, ending
  with the streams rejected for load when there were any.

How the stages add up: decode wait, decode and the wait for more input are
per chunk, queue wait per work item, inference and postprocess per batch
(every item of a batch waits for all of it), write per response message.
Their means are added as if each chunk had one work item in one batch and
one message. The rest of the mean latency is time between stages: the event
loop, and results waiting for a message being written.

The verdict first checks what chunk latency cannot show: no traffic, video
frames dropped by keep-latest, and an event loop whose timer runs late much
of the time (chunks then wait unread before their latency starts). Then it
looks at the model whose chunks spent the most time in total and picks the
largest group of its stages: decode (wait and decode), waiting for more
input, model (queue wait, inference, postprocess), or write and event
loop/network. The
saturation figures then tell which change helps; the rules are in
``_verdict``. Only the standard library and prometheus_client's text parser
are used, and only the URL the user gives is fetched (no proxies, no
redirects).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import math
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any, TextIO

DEFAULT_URL = "http://127.0.0.1:9464/metrics"
DEFAULT_INTERVAL_S = 5.0
FETCH_TIMEOUT_S = 10.0
SNAPSHOT_FORMAT = "streaminfer-diagnose-snapshot"
SNAPSHOT_VERSION = 1
# While waiting between scrapes, a progress line at most this often.
PROGRESS_EVERY_S = 10.0

# Thresholds of the verdict.
# The event loop counts as blocked when its timer runs late this share of the time, or its p99 lag passes LOOP_P99_S.
LOOP_LATE_SHARE = 0.2
LOOP_P99_S = 0.05
# Past this share the loop is the bottleneck whatever the stages show, because chunks wait unread in the
# sockets and chunk latency (counted from the read) cannot show that wait.
LOOP_BLOCKED_SHARE = 0.4
# A stage "busy" this much is saturated.
BUSY = 0.6
# The event loop counts as close to its limit at this share of admission.max_busy_fraction, because
# admission adds one stream's cost and the arrival reserve to the measured fraction before comparing.
# NOTE: 0.85 is a chosen margin, not one measured on loaded servers.
LOOP_NEAR_LIMIT = 0.85
CPU_FULL = 0.9
# Keep-latest video drops above this share of frames read call for a lower frame rate.
FRAME_DROP_SHARE = 0.1
# With every saturation under HEALTHY_BUSY, mean latency under HEALTHY_LATENCY_S and drops under
# HEALTHY_DROP_SHARE, the server is called healthy.
HEALTHY_BUSY = 0.5
HEALTHY_LATENCY_S = 0.02
HEALTHY_DROP_SHARE = 0.01
# Rejections that mean the server is at capacity (admission), not a client problem. Streams rejected
# while the server shuts down (draining) are not load, and are named as a shutdown.
LOAD_REJECTIONS = ("max_streams", "learned_max_streams", "busy", "queue_wait")
# Meanings of the reasons whose label alone could be read as load.
REASON_MEANINGS = {"draining": "the server was shutting down"}

# The metrics read, as exported by streaminfer.server.metrics.
M_CHUNKS_RECEIVED = "streaminfer_chunks_received_total"
M_CHUNKS_PROCESSED = "streaminfer_chunks_processed_total"
M_CHUNKS_DROPPED = "streaminfer_chunks_dropped_total"
M_CHUNK_LATENCY = "streaminfer_chunk_latency_seconds"
M_DECODE_WAIT = "streaminfer_decode_wait_seconds"
M_DECODE = "streaminfer_decode_seconds"
M_QUEUE_WAIT = "streaminfer_queue_wait_seconds"
M_INFERENCE = "streaminfer_inference_seconds"
M_POSTPROCESS = "streaminfer_postprocess_seconds"
M_INPUT_WAIT = "streaminfer_input_wait_seconds"
M_WRITE = "streaminfer_write_seconds"
M_BATCH_SIZE = "streaminfer_batch_size"
M_BATCH_FILL = "streaminfer_batch_fill_ratio"
M_BATCHES = "streaminfer_batches_total"
M_MAX_BATCH_SIZE = "streaminfer_max_batch_size"
M_INSTANCES = "streaminfer_model_instances"
M_QUEUE_DEPTH = "streaminfer_queue_depth"
M_STREAMS_ACTIVE = "streaminfer_streams_active"
M_STREAMS_STARTED = "streaminfer_streams_started_total"
M_STREAMS_REJECTED = "streaminfer_streams_rejected_total"
M_STREAMS_PAUSED = "streaminfer_streams_paused"
M_ENDED_BY_SERVER = "streaminfer_streams_ended_by_server_total"
M_LOOP_LAG = "streaminfer_event_loop_lag_seconds"
M_CPU = "streaminfer_process_cpu_seconds_total"
M_CPU_CORES = "streaminfer_cpu_cores"
M_BUSY_FRACTION = "streaminfer_busy_fraction"
M_MAX_BUSY_FRACTION = "streaminfer_max_busy_fraction"
M_BUSY_CAPACITY = "streaminfer_busy_capacity_streams"
M_BUSY_ARRIVAL_RESERVE = "streaminfer_busy_arrival_reserve"
M_DECODE_THREADS = "streaminfer_decode_threads"
M_DECODE_BUSY = "streaminfer_decode_busy_seconds_total"
M_DECODE_QUEUE_DEPTH = "streaminfer_decode_queue_depth"

READ_METRICS = tuple(value for name, value in dict(globals()).items() if name.startswith("M_"))

STAGE_NAMES = {
    "decode_wait": "decode wait",
    "decode": "decode",
    "input_wait": "waiting for more input",
    "queue_wait": "queue wait",
    "inference": "inference",
    "postprocess": "postprocess",
    "write": "write",
    "event_loop_network": "event loop/network",
}
STAGE_NAME_WIDTH = max(len(name) for name in STAGE_NAMES.values())


class DiagnoseError(Exception):
    """A page that cannot be read or is not streaminfer's, or a bad snapshot file."""


# -- reading pages -------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        raise DiagnoseError(f"{req.full_url} redirects to {newurl}; diagnose follows no redirects: pass the /metrics URL itself")


def fetch(url: str, timeout: float = FETCH_TIMEOUT_S) -> str:
    """Return the text of ``url``, fetched directly (no proxy, no redirect)."""
    if not url.startswith(("http://", "https://")):
        raise DiagnoseError(f"--url {url!r} is invalid: expected an http:// or https:// URL such as {DEFAULT_URL}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    try:
        with opener.open(url, timeout=timeout) as response:
            body = response.read()
            charset = response.headers.get_content_charset() or "utf-8"
    except urllib.error.HTTPError as error:
        raise DiagnoseError(f"{url} returned HTTP {error.code} {error.reason}; is it the server's /metrics page?") from error
    except http.client.HTTPException as error:
        # The gRPC port replies to HTTP/1.1 with HTTP/2 frames.
        raise DiagnoseError(
            f"{url} did not respond in HTTP/1.1 ({type(error).__name__}); is this the gRPC port? The metrics page "
            "is on the port that serve prints as 'metrics on' (server.metrics_port, 9464 by default)"
        ) from error
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise DiagnoseError(
            f"cannot read {url}: {reason}; is the server running with metrics on (serve --metrics-port)?"
        ) from error
    try:
        return body.decode(charset)
    except (UnicodeDecodeError, LookupError) as error:
        raise DiagnoseError(f"{url} is not a streaminfer metrics page: its body is not text ({error})") from error


@dataclasses.dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts by upper bound (the last is +Inf), with sum and count."""

    buckets: tuple[tuple[float, float], ...]
    sum: float
    count: float

    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def quantile(self, q: float) -> tuple[float | None, bool]:
        """Estimate the q-quantile by linear interpolation inside its bucket.

        Returns (value, above): above is True when the quantile lies in the
        +Inf bucket, and value is then the largest finite bound.
        """
        if self.count <= 0 or not self.buckets:
            return None, False
        rank = q * self.count
        lower, below = 0.0, 0.0
        for bound, cumulative in self.buckets:
            if cumulative >= rank and cumulative > below:
                if math.isinf(bound):
                    return lower, True
                return lower + (bound - lower) * (rank - below) / (cumulative - below), False
            lower, below = (bound if not math.isinf(bound) else lower), cumulative
        return lower, True


class Page:
    """One parsed /metrics page: sample values by name and labels."""

    def __init__(self, text: str, url: str = "") -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        try:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    self.samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
        except Exception as error:  # the parser raises ValueError, IndexError and more on foreign text
            raise DiagnoseError(
                f"{url or 'the page'} is not a streaminfer metrics page: it does not parse as Prometheus text ({error})"
            ) from error
        if not any(name.startswith("streaminfer_") for name in self.samples):
            raise DiagnoseError(
                f"{url or 'the page'} is not a streaminfer metrics page: it has no streaminfer_ metrics "
                f"({len(self.samples)} other samples); point --url at the server's metrics port"
            )

    def _matching(self, name: str, labels: dict[str, str]) -> Iterable[tuple[dict[str, str], float]]:
        for sample_labels, value in self.samples.get(name, ()):
            if all(sample_labels.get(key) == wanted for key, wanted in labels.items()):
                yield sample_labels, value

    def has(self, name: str) -> bool:
        return name in self.samples or f"{name}_count" in self.samples

    def value(self, name: str, **labels: str) -> float:
        """Return the sum of every sample of ``name`` with these labels (others summed over); 0 when absent."""
        return sum(value for _, value in self._matching(name, labels))

    def label_values(self, name: str, label: str) -> list[str]:
        values = {sample_labels[label] for sample_labels, _ in self.samples.get(name, ()) if label in sample_labels}
        return sorted(values)

    def label_sets(self, name: str, *labels: str) -> list[tuple[str, ...]]:
        found = {
            tuple(sample_labels.get(label, "") for label in labels) for sample_labels, _ in self.samples.get(name, ())
        }
        return sorted(found)

    def histogram(self, name: str, **labels: str) -> Histogram:
        by_bound: dict[float, float] = {}
        for sample_labels, value in self._matching(f"{name}_bucket", labels):
            bound = float(sample_labels.get("le", "+Inf"))
            by_bound[bound] = by_bound.get(bound, 0.0) + value
        return Histogram(
            tuple(sorted(by_bound.items())), self.value(f"{name}_sum", **labels), self.value(f"{name}_count", **labels)
        )


class Window:
    """The changes between two pages read ``interval_s`` apart."""

    def __init__(self, before: Page, after: Page, interval_s: float) -> None:
        self.before = before
        self.after = after
        self.interval_s = interval_s
        self.restarted = False

    def _delta(self, before: float, after: float) -> float:
        if after < before:
            # A counter went down: the server restarted between the scrapes.
            self.restarted = True
            return after
        return after - before

    def counter(self, name: str, **labels: str) -> float:
        return self._delta(self.before.value(name, **labels), self.after.value(name, **labels))

    def rate(self, name: str, **labels: str) -> float:
        return self.counter(name, **labels) / self.interval_s if self.interval_s > 0 else 0.0

    def gauge(self, name: str, **labels: str) -> float:
        return self.after.value(name, **labels)

    def histogram(self, name: str, **labels: str) -> Histogram:
        before = self.before.histogram(name, **labels)
        after = self.after.histogram(name, **labels)
        if after.count < before.count:
            self.restarted = True
            return after
        earlier = dict(before.buckets)
        buckets = tuple((bound, max(0.0, cumulative - earlier.get(bound, 0.0))) for bound, cumulative in after.buckets)
        return Histogram(buckets, max(0.0, after.sum - before.sum), after.count - before.count)

    def label_sets(self, name: str, *labels: str) -> list[tuple[str, ...]]:
        return sorted(set(self.before.label_sets(name, *labels)) | set(self.after.label_sets(name, *labels)))


# -- snapshots -----------------------------------------------------------------


@dataclasses.dataclass
class Snapshot:
    """Two scrapes of one URL and the seconds between them."""

    url: str
    before: str
    after: str
    interval_s: float
    taken_at: float = 0.0  # Unix time of the second scrape

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "url": self.url,
            "interval_s": self.interval_s,
            "taken_at": self.taken_at,
            "scrapes": [self.before, self.after],
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> Snapshot:
        if not isinstance(data, dict) or data.get("format") != SNAPSHOT_FORMAT:
            raise DiagnoseError(f"{where} is not a diagnose snapshot: expected a JSON file written by diagnose --save")
        if data.get("version") != SNAPSHOT_VERSION:
            raise DiagnoseError(f"{where} has snapshot version {data.get('version')!r}; this diagnose reads version {SNAPSHOT_VERSION}")
        scrapes = data.get("scrapes")
        interval = data.get("interval_s")
        if (
            not isinstance(scrapes, list)
            or len(scrapes) != 2
            or not all(isinstance(text, str) for text in scrapes)
            or not isinstance(interval, (int, float))
            or interval <= 0
        ):
            raise DiagnoseError(f"{where} is damaged: expected two scrapes and interval_s > 0")
        return cls(str(data.get("url", "")), scrapes[0], scrapes[1], float(interval), float(data.get("taken_at", 0.0)))


def take_snapshot(
    url: str,
    interval_s: float = DEFAULT_INTERVAL_S,
    progress: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Snapshot:
    """Scrape ``url``, wait ``interval_s`` seconds, scrape again."""
    before = fetch(url)
    Page(before, url)  # fail now, not after the wait, on a page that is not streaminfer's
    started = time.monotonic()
    end = started + interval_s
    first = True
    while True:
        remaining = end - time.monotonic()
        if remaining <= 0:
            break
        if progress is not None:
            remaining_text = f"{remaining:.1f}" if remaining < 10 else f"{remaining:.0f}"
            if first:
                progress(f"streaminfer diagnose: first scrape of {url} done; waiting {remaining_text} s for the second")
            else:
                progress(f"streaminfer diagnose: waiting {remaining_text} s more for the second scrape")
        first = False
        sleep(min(remaining, PROGRESS_EVERY_S))
    after = fetch(url)
    interval = time.monotonic() - started
    if progress is not None:
        progress(f"streaminfer diagnose: second scrape done, {interval:.1f} s after the first")
    return Snapshot(url, before, after, interval, time.time())


def save_snapshot(snapshot: Snapshot, path: str) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(snapshot.to_json(), file)
        file.write("\n")


def load_snapshot(path: str) -> Snapshot:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except OSError as error:
        raise DiagnoseError(f"cannot read snapshot {path}: {error.strerror or error}") from error
    except ValueError as error:
        raise DiagnoseError(f"{path} is not a diagnose snapshot: it is not JSON ({error})") from error
    return Snapshot.from_json(data, path)


# -- the report ----------------------------------------------------------------


def _share(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 0.0


def _busy(seconds_per_s: float, capacity: float) -> float:
    """Busy seconds per second over capacity, at most 1: a counter updated once a second can overshoot in a short window."""
    return min(1.0, _share(seconds_per_s, capacity))


def _mean(histogram: Histogram) -> float:
    mean = histogram.mean()
    return mean if mean is not None else 0.0


def _latency(window: Window) -> list[dict[str, Any]]:
    """Per model and modality: chunks, mean, p50, p99 and the mean per stage, stages largest first."""
    write = _mean(window.histogram(M_WRITE))
    entries = []
    for model, modality in window.label_sets(f"{M_CHUNK_LATENCY}_count", "model", "modality"):
        latency = window.histogram(M_CHUNK_LATENCY, model=model, modality=modality)
        if latency.count <= 0:
            continue
        mean = _mean(latency)
        p50, p50_above = latency.quantile(0.5)
        p99, p99_above = latency.quantile(0.99)
        parts = {
            "decode_wait": _mean(window.histogram(M_DECODE_WAIT, modality=modality)),
            "decode": _mean(window.histogram(M_DECODE, modality=modality)),
            "input_wait": _mean(window.histogram(M_INPUT_WAIT, model=model)),
            "queue_wait": _mean(window.histogram(M_QUEUE_WAIT, model=model)),
            "inference": _mean(window.histogram(M_INFERENCE, model=model)),
            "postprocess": _mean(window.histogram(M_POSTPROCESS, model=model)),
            "write": write,
        }
        measured = sum(parts.values())
        parts["event_loop_network"] = max(0.0, mean - measured)
        total = max(mean, measured)
        stages = sorted(
            ({"stage": stage, "mean_s": seconds, "share": _share(seconds, total)} for stage, seconds in parts.items()),
            key=lambda stage: -stage["mean_s"],
        )
        entries.append(
            {
                "model": model,
                "modality": modality,
                "chunks": latency.count,
                "mean_s": mean,
                "p50_s": p50,
                "p50_above_top_bucket": p50_above,
                "p99_s": p99,
                "p99_above_top_bucket": p99_above,
                "total_s": latency.sum,
                "stages_exceed_latency": measured > mean * 1.05,
                "stages": stages,
            }
        )
    entries.sort(key=lambda entry: -entry["total_s"])
    return entries


def _batches(window: Window) -> list[dict[str, Any]]:
    models = {model for (model,) in window.label_sets(M_BATCHES, "model")}
    models |= {model for (model,) in window.label_sets(f"{M_INFERENCE}_count", "model")}
    entries = []
    for model in sorted(models):
        full = window.counter(M_BATCHES, model=model, reason="full")
        delay = window.counter(M_BATCHES, model=model, reason="delay")
        sizes = window.histogram(M_BATCH_SIZE, model=model)
        fill = window.histogram(M_BATCH_FILL, model=model)
        inference = window.histogram(M_INFERENCE, model=model)
        postprocess = window.histogram(M_POSTPROCESS, model=model)
        instances = window.gauge(M_INSTANCES, model=model)
        busy_per_s = (inference.sum + postprocess.sum) / window.interval_s if window.interval_s > 0 else 0.0
        entries.append(
            {
                "model": model,
                "batches": full + delay,
                "closed_full": full,
                "closed_delay": delay,
                "share_full": _share(full, full + delay),
                "share_delay": _share(delay, full + delay),
                "mean_batch_size": _mean(sizes),
                "max_batch_size": window.gauge(M_MAX_BATCH_SIZE, model=model),
                "mean_fill_ratio": _mean(fill),
                "inference_mean_s": _mean(inference),
                "inference_s_per_s": inference.sum / window.interval_s if window.interval_s > 0 else 0.0,
                "postprocess_s_per_s": postprocess.sum / window.interval_s if window.interval_s > 0 else 0.0,
                "instances": instances,
                "busy": _busy(busy_per_s, instances),
                "queue_depth": window.gauge(M_QUEUE_DEPTH, model=model),
            }
        )
    entries.sort(key=lambda entry: -entry["busy"])
    return entries


def _saturation(window: Window, batches: list[dict[str, Any]]) -> dict[str, Any]:
    interval = window.interval_s
    threads = window.gauge(M_DECODE_THREADS)
    decode_busy_per_s = window.rate(M_DECODE_BUSY)
    cores = window.gauge(M_CPU_CORES)
    cpu_per_s = window.rate(M_CPU)
    lag = window.histogram(M_LOOP_LAG)
    lag_p99, lag_above = lag.quantile(0.99)

    entries = [
        {
            "stage": f"model {entry['model']} instances",
            "busy": entry["busy"],
            "detail": f"{entry['inference_s_per_s']:.2f} s/s inference + {entry['postprocess_s_per_s']:.2f} s/s "
            f"postprocess over {entry['instances']:.0f} instance(s); {entry['queue_depth']:.0f} items queued",
        }
        for entry in batches
        if entry["batches"] or entry["busy"]
    ]
    entries.append(
        {
            "stage": "decode threads",
            "busy": _busy(decode_busy_per_s, threads),
            "detail": f"{decode_busy_per_s:.2f} s/s busy over {threads:.0f} thread(s); "
            f"{window.gauge(M_DECODE_QUEUE_DEPTH):.0f} job(s) waiting",
        }
    )
    late_share = _busy(lag.sum, interval)
    entries.append(
        {
            "stage": "event loop timer",
            "busy": late_share,
            "detail": f"a 20 ms timer late {late_share:.0%} of the time; lag mean {_ms(_mean(lag))}, "
            f"p99 {'>' if lag_above else ''}{_ms(lag_p99 or 0.0)}",
        }
    )
    # The gauge covers only the second before a scrape. The larger of its two readings is used, so load
    # that ended before the second scrape still shows.
    busy_by_scrape = (window.before.value(M_BUSY_FRACTION), window.after.value(M_BUSY_FRACTION))
    busy_fraction = max(busy_by_scrape)
    busy_scrape = "first" if busy_by_scrape[0] > busy_by_scrape[1] else "second"
    max_busy_fraction = window.gauge(M_MAX_BUSY_FRACTION)
    busy_capacity = int(window.gauge(M_BUSY_CAPACITY))
    arrival_reserve = window.gauge(M_BUSY_ARRIVAL_RESERVE)
    if max_busy_fraction > 0:
        capacity = ""
        if busy_capacity:
            capacity = f"; at the cost per stream learned so far it allows {busy_capacity} open streams"
        if arrival_reserve > 0:
            capacity += f"; {arrival_reserve:.3f} of the loop kept for new streams arriving, so a burst stops sooner"
        entries.append(
            {
                "stage": "event loop busy fraction",
                "busy": busy_fraction,
                "detail": f"the loop busy instead of waiting for the network, the larger of its readings at the first "
                f"and second scrape, {busy_by_scrape[0]:.0%} and {busy_by_scrape[1]:.0%}; admission.max_busy_fraction "
                f"{max_busy_fraction:g}{capacity}",
            }
        )
    entries.append(
        {
            "stage": "process CPU",
            "busy": _busy(cpu_per_s, cores),
            "detail": f"{cpu_per_s:.2f} cores busy of {cores:.0f}",
        }
    )
    entries.sort(key=lambda entry: -entry["busy"])

    return {
        "stages": entries,
        # Over the second before a scrape, the larger of the two readings, and 0 when the server's
        # busy-fraction check is off. busy_fraction_scrape is the scrape it was read at ("first" or "second").
        "busy_fraction": busy_fraction,
        "busy_fraction_scrape": busy_scrape,
        "busy_fraction_by_scrape": list(busy_by_scrape),
        "max_busy_fraction": max_busy_fraction,
        # Open streams the busy-fraction check allows at the learned cost per stream; 0 before it is learned.
        "busy_capacity_streams": busy_capacity,
        # Share of the loop the busy-fraction check keeps for new streams arriving; 0 while none arrive.
        "busy_arrival_reserve": arrival_reserve,
        "decode_threads": threads,
        "decode_busy": _busy(decode_busy_per_s, threads),
        "cpu_cores": cores,
        "cpu": _busy(cpu_per_s, cores),
        "loop_late_share": late_share,
        "loop_lag_mean_s": _mean(lag),
        "loop_lag_p99_s": lag_p99 or 0.0,
    }


def _by_reason(window: Window, name: str, *labels: str) -> list[dict[str, Any]]:
    entries = []
    for values in window.label_sets(name, *labels):
        count = window.counter(name, **dict(zip(labels, values)))
        if count > 0:
            entries.append({**dict(zip(labels, values)), "count": count})
    entries.sort(key=lambda entry: -entry["count"])
    return entries


def diagnose(snapshot: Snapshot) -> dict[str, Any]:
    """Return the report on ``snapshot`` as a JSON-ready dict; seconds are seconds, shares are 0..1."""
    window = Window(Page(snapshot.before, snapshot.url), Page(snapshot.after, snapshot.url), snapshot.interval_s)
    received = {modality: window.counter(M_CHUNKS_RECEIVED, modality=modality) for (modality,) in window.label_sets(M_CHUNKS_RECEIVED, "modality")}
    processed = window.counter(M_CHUNKS_PROCESSED)
    drops = _by_reason(window, M_CHUNKS_DROPPED, "modality", "reason")
    for drop in drops:
        drop["share"] = _share(drop["count"], received.get(drop["modality"], 0.0))
    rejections = _by_reason(window, M_STREAMS_REJECTED, "reason")
    started = window.counter(M_STREAMS_STARTED)
    for rejection in rejections:
        rejection["share"] = _share(rejection["count"], rejection["count"] + started)

    latency = _latency(window)
    batches = _batches(window)
    saturation = _saturation(window, batches)
    traffic = {
        "chunks_received": sum(received.values()),
        "chunks_received_by_modality": received,
        "chunks_per_s": _share(sum(received.values()), window.interval_s),
        "chunks_acked": processed,
        "chunks_dropped": sum(drop["count"] for drop in drops),
        "streams_started": started,
        "streams_rejected": sum(rejection["count"] for rejection in rejections),
        "streams_active": window.gauge(M_STREAMS_ACTIVE),
        "streams_paused": window.gauge(M_STREAMS_PAUSED),
        "streams_ended_by_server": _by_reason(window, M_ENDED_BY_SERVER, "reason"),
        "batches": sum(entry["batches"] for entry in batches),
    }

    report: dict[str, Any] = {
        "url": snapshot.url,
        "interval_s": snapshot.interval_s,
        "taken_at": snapshot.taken_at,
        # Streams rejected for load are traffic, even when no chunk was read.
        "idle": traffic["chunks_received"] == 0
        and not latency
        and traffic["batches"] == 0
        and not any(rejection["reason"] in LOAD_REJECTIONS for rejection in rejections),
        "traffic": traffic,
        "latency": latency,
        "batches": batches,
        "saturation": saturation,
        "drops": drops,
        "rejections": rejections,
    }
    report["verdict"] = _verdict(report)
    report["findings"] = _findings(report)
    report["server_restarted"] = window.restarted
    return report


def _stage(entry: dict[str, Any], stage: str) -> float:
    return next(part["mean_s"] for part in entry["stages"] if part["stage"] == stage)


def _stage_text(entry: dict[str, Any], stage: str) -> str:
    """Return a stage's mean and share as the latency breakdown shows them, e.g. "write 6.4 ms (15%)"."""
    part = next(part for part in entry["stages"] if part["stage"] == stage)
    return f"{STAGE_NAMES[stage]} {_ms(part['mean_s'])} ({part['share']:.0%})"


def _load_rejections(report: dict[str, Any]) -> str:
    """Return the streams rejected for load in the window, by reason, with their share of new streams ("" when none)."""
    reasons = [r for r in report["rejections"] if r["reason"] in LOAD_REJECTIONS]
    count = sum(r["count"] for r in reasons)
    if not count:
        return ""
    named = ", ".join(f"{r['reason']} {r['count']:.0f}" for r in reasons)
    share = _share(count, count + report["traffic"]["streams_started"])
    return f"{count:.0f} streams rejected for load ({named}), {share:.0%} of new streams"


def _busy_text(saturation: dict[str, Any]) -> str:
    """Return the loop's busy fraction with the second it covers, e.g. "busy 72% of the second before the first scrape"."""
    return f"busy {saturation['busy_fraction']:.0%} of the second before the {saturation['busy_fraction_scrape']} scrape"


def _busiest(saturation: dict[str, Any], skip: str = "", max_stages: int = 3) -> str:
    """Return the stages at least HEALTHY_BUSY busy, busiest first, with their figures ("" when none)."""
    named = []
    for stage in saturation["stages"]:
        if stage["busy"] < HEALTHY_BUSY or stage["stage"] == skip:
            continue
        if stage["stage"] == "event loop busy fraction":
            named.append(
                f"event loop {_busy_text(saturation)} against admission.max_busy_fraction "
                f"{saturation['max_busy_fraction']:g}"
            )
        else:
            named.append(f"{stage['stage']} {stage['busy']:.0%} busy")
    return ", ".join(named[:max_stages])


def _verdict(report: dict[str, Any]) -> dict[str, Any]:
    """Name the bottleneck and the change: returns kind, model, line and change."""
    traffic = report["traffic"]
    saturation = report["saturation"]
    # Every verdict line ends with the streams rejected for load in the window, unless it names them itself.
    rejected = _load_rejections(report)

    def verdict(kind: str, line: str, change: str, model: str = "", names_rejections: bool = False) -> dict[str, Any]:
        if rejected and not names_rejections:
            line = f"{line}; {rejected}"
        return {"kind": kind, "model": model, "line": line, "change": change}

    if report["idle"]:
        return verdict(
            "idle",
            f"no traffic: no chunk was read and no batch ran in the {report['interval_s']:.1f} s between scrapes",
            "send load while diagnose runs, or pass a longer --interval",
        )

    video = traffic["chunks_received_by_modality"].get("video", 0.0)
    overflow = sum(d["count"] for d in report["drops"] if d["modality"] == "video" and d["reason"] == "overflow")
    if video and overflow / video >= FRAME_DROP_SHARE:
        return verdict(
            "frame_rate",
            f"video frames arrive faster than they are processed: {overflow:.0f} of {video:.0f} frames "
            f"({overflow / video:.0%}) dropped as OVERFLOW (keep-latest)",
            "lower the per-stream frame rate (or frame size) the clients send",
        )

    late = saturation["loop_late_share"]
    if late >= LOOP_BLOCKED_SHARE:
        return verdict(
            "event_loop",
            f"the event loop is blocked: its timer ran late {late:.0%} of the time (lag mean "
            f"{_ms(saturation['loop_lag_mean_s'])}, p99 {_ms(saturation['loop_lag_p99_s'])}); chunks wait unread "
            "before their latency starts to count",
            "add workers (serve --workers N) or replicas, and keep blocking work off the event loop",
            report["latency"][0]["model"] if report["latency"] else "",
        )

    load_rejected = sum(r["count"] for r in report["rejections"] if r["reason"] in LOAD_REJECTIONS)
    if not report["latency"]:
        if load_rejected:
            return verdict("workers", "no chunk answered in the interval", "add workers (serve --workers N) or replicas")
        return verdict("none", "chunks were read but none answered in the interval", "scrape over a longer --interval")

    focus = report["latency"][0]
    model = focus["model"]
    batch = next((entry for entry in report["batches"] if entry["model"] == model), None)
    busiest = max((stage["busy"] for stage in saturation["stages"]), default=0.0)
    worst_drop = max((drop["share"] for drop in report["drops"]), default=0.0)
    top_stage = focus["stages"][0]
    if (
        focus["mean_s"] < HEALTHY_LATENCY_S
        and busiest < HEALTHY_BUSY
        and worst_drop < HEALTHY_DROP_SHARE
        and not load_rejected
    ):
        return verdict(
            "none",
            f"no bottleneck: {model} answers in {_ms(focus['mean_s'])} mean, p99 {_ms(focus['p99_s'])}; the largest "
            f"stage is {STAGE_NAMES[top_stage['stage']]} ({_ms(top_stage['mean_s'])}) and nothing is over "
            f"{HEALTHY_BUSY:.0%} busy",
            "nothing needs to change at this load",
            model,
        )

    def at_admission_limit() -> dict[str, Any]:
        return verdict(
            "capacity",
            f"the server is at its admission limit and keeps its latency: {rejected}, while {model} answers in "
            f"{_ms(focus['mean_s'])} mean, p99 {_ms(focus['p99_s'])}",
            "for more streams add workers (serve --workers N) or replicas; raise the limit that rejects them only "
            "if p99 stays well within the budget at the higher load",
            model,
            names_rejections=True,
        )

    # Healthy but for streams rejected for load: admission keeps the latency
    # low, and no stage needs a change.
    if load_rejected and focus["mean_s"] < HEALTHY_LATENCY_S and worst_drop < HEALTHY_DROP_SHARE:
        return at_admission_limit()

    parts = {stage["stage"]: stage["mean_s"] for stage in focus["stages"]}
    groups = {
        "decode": parts["decode_wait"] + parts["decode"],
        "input": parts["input_wait"],
        "model": parts["queue_wait"] + parts["inference"] + parts["postprocess"],
        "transport": parts["write"] + parts["event_loop_network"],
    }
    group = max(groups, key=lambda name: groups[name])
    total = max(focus["mean_s"], sum(parts.values()))
    share = _share(groups[group], total)
    cores = saturation["cpu_cores"]
    cpu = saturation["cpu"]
    where = f"{model} ({focus['modality']}): mean chunk latency {_ms(focus['mean_s'])}, p99 {_ms(focus['p99_s'])}"

    if group == "input":
        return verdict(
            "input_wait",
            f"chunks wait for later input: {_ms(parts['input_wait'])} mean between a chunk's decode and the model "
            f"input that completes it, {share:.0%} of {where}; the model needs whole windows or sentences, and the "
            "server is not the cause",
            "for audio, send the model's own rate (16 kHz for silero_vad) in chunks of whole 32 ms windows; "
            "for text, end sentences sooner or send a FLUSH control message",
            model,
        )

    if group == "transport":
        loop_blocked = saturation["loop_late_share"] >= LOOP_LATE_SHARE or saturation["loop_lag_p99_s"] >= LOOP_P99_S
        loop_saturated = 0 < saturation["max_busy_fraction"] <= saturation["busy_fraction"]
        write_timeouts = sum(e["count"] for e in traffic["streams_ended_by_server"] if e["reason"] == "write_timeout")
        if loop_saturated:
            return verdict(
                "event_loop",
                f"the event loop is near its limit: {_busy_text(saturation)}, at or over "
                f"admission.max_busy_fraction {saturation['max_busy_fraction']:g}; write and event loop/network "
                f"are {share:.0%} of {where}",
                "add workers (serve --workers N) or replicas: new streams are rejected (busy) until the load falls",
                model,
            )
        if loop_blocked:
            return verdict(
                "event_loop",
                f"the event loop is blocked: its timer ran late {saturation['loop_late_share']:.0%} of the time "
                f"(p99 lag {_ms(saturation['loop_lag_p99_s'])}); write and event loop/network are {share:.0%} of {where}",
                "add workers (serve --workers N) or replicas, and keep blocking work off the event loop",
                model,
            )
        if parts["write"] >= parts["event_loop_network"] or traffic["streams_paused"] or write_timeouts:
            return verdict(
                "slow_clients",
                f"clients read too slowly: writing a response takes {_ms(parts['write'])} mean, "
                f"{traffic['streams_paused']:.0f} streams paused with a full window, {write_timeouts:.0f} ended by "
                f"write timeout; write and event loop/network are {share:.0%} of {where}",
                "make clients read responses as they come (a reader task apart from the sender)",
                model,
            )
        # Each part of the time between stages is named with the share the latency breakdown shows for it.
        waits = _stage_text(focus, "event_loop_network")
        if _share(parts["write"], total) >= 0.005:
            waits += f" and {_stage_text(focus, 'write')}"
        waits = f"chunks wait between stages: {waits} of {where}"
        if cpu >= CPU_FULL:
            return verdict(
                "workers",
                f"the process uses {cpu:.0%} of {cores:.0f} cores and {waits}",
                "add workers (serve --workers N) or replicas on more cores",
                model,
            )
        rejected_busy = any(r["reason"] == "busy" for r in report["rejections"])
        max_busy_fraction = saturation["max_busy_fraction"]
        if max_busy_fraction > 0 and saturation["busy_fraction"] >= LOOP_NEAR_LIMIT * max_busy_fraction:
            others = _busiest(saturation, skip="event loop busy fraction")
            return verdict(
                "event_loop",
                f"the event loop is close to its limit: {_busy_text(saturation)} against "
                f"admission.max_busy_fraction {max_busy_fraction:g}; {waits}"
                + (f"; other busy stages: {others}" if others else ""),
                "add workers (serve --workers N) or replicas: each process has one event loop"
                + (", and admission rejects new streams (busy) as it reaches its limit" if rejected_busy else ""),
                model,
            )
        # Neither the loop, the CPU nor slow clients explain the wait. The metrics do not say where
        # clients connect from, so the network advice is conditional.
        busiest = _busiest(saturation)
        return verdict(
            "event_loop",
            f"{waits}; "
            + (f"the busiest stages: {busiest}" if busiest else f"no stage is over {HEALTHY_BUSY:.0%} busy"),
            "add workers (serve --workers N) or replicas; if clients connect over a network rather than loopback, "
            "check the network between them and the server",
            model,
        )

    if group == "decode":
        threads = saturation["decode_threads"]
        waiting = parts["decode_wait"] >= parts["decode"] or saturation["decode_busy"] >= BUSY
        numbers = (
            f"decode wait {_ms(parts['decode_wait'])} + decode {_ms(parts['decode'])} are {share:.0%} of {where}; "
            f"{threads:.0f} decode thread(s) {saturation['decode_busy']:.0%} busy, CPU {cpu:.0%} of {cores:.0f} cores"
        )
        # Only video streams are spread over the decode threads; audio and
        # text streams share the first one.
        if waiting and focus["modality"] == "video" and threads < cores and cpu < CPU_FULL:
            return verdict(
                "decode_threads",
                f"the decode pool is starved: {numbers}",
                f"add decode threads (serve --decode-threads {int(threads) + 1} or more, up to the {cores:.0f} cores)",
                model,
            )
        if waiting and focus["modality"] != "video":
            return verdict(
                "workers",
                f"the decode thread of audio and text streams is starved: {numbers}",
                "add workers (serve --workers N) or replicas: each process decodes audio and text on one thread",
                model,
            )
        if waiting:
            return verdict(
                "workers",
                f"decoding has run out of cores: {numbers}",
                "add workers (serve --workers N) or replicas on more cores",
                model,
            )
        if focus["modality"] == "video":
            return verdict(
                "frame_rate",
                f"each frame is costly to decode: {numbers}",
                "lower the per-stream frame rate or send smaller (or raw) frames",
                model,
            )
        return verdict(
            "decode_cost",
            f"each chunk is costly to decode: {numbers}",
            "send the sample rate the model uses (no resampling) or smaller chunks; add decode threads for throughput",
            model,
        )

    # The model's stages.
    busy = batch["busy"] if batch else 0.0
    instances = batch["instances"] if batch else 0.0
    numbers = (
        f"queue wait {_ms(parts['queue_wait'])} + inference {_ms(parts['inference'])} are {share:.0%} of {where}"
    )
    if batch:
        numbers += (
            f"; {instances:.0f} instance(s) {busy:.0%} busy, batches of {batch['mean_batch_size']:.1f} of max "
            f"{batch['max_batch_size']:.0f}, {batch['share_full']:.0%} closed full"
        )
    if batch and batch["share_full"] >= 0.5 and parts["queue_wait"] >= parts["inference"]:
        return verdict(
            "batch_size",
            f"batches are capped by max_batch_size: {numbers}",
            f"raise max_batch_size of {model} (now {batch['max_batch_size']:.0f}) so one batch takes the queue, "
            "or its max_queue_delay_ms",
            model,
        )
    if batch and busy >= BUSY and batch["share_delay"] >= 0.8 and batch["mean_batch_size"] <= 2 and batch["max_batch_size"] > 2:
        return verdict(
            "batch_delay",
            f"the model runs many small batches: {numbers}",
            f"raise max_queue_delay_ms of {model} so batches fill, or add model instances",
            model,
        )
    if busy >= BUSY:
        return verdict(
            "model_instances",
            f"the model is saturated: {numbers}",
            f"add model instances (instances = {int(instances) + 1} or more for {model}), or a faster device",
            model,
        )
    if load_rejected and worst_drop < HEALTHY_DROP_SHARE and share < 0.5:
        # The model is not saturated and takes under half the latency, while
        # admission rejects streams for load: the limit stops more streams.
        return at_admission_limit()
    if parts["inference"] >= parts["queue_wait"]:
        return verdict(
            "model_speed",
            f"the model itself is slow: {numbers}",
            f"a faster model or device for {model}; more instances help throughput, not this latency",
            model,
        )
    return verdict(
        "batch_delay",
        f"chunks wait for their batch to close: {numbers}",
        f"lower max_queue_delay_ms of {model} if latency matters more than batch size",
        model,
    )


def _findings(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Return every figure that can explain slowness, as lines ranked by impact (0..1)."""
    findings: list[dict[str, Any]] = []
    if report["latency"]:
        focus = report["latency"][0]
        for stage in focus["stages"]:
            if stage["mean_s"] > 0:
                findings.append(
                    {
                        "impact": stage["share"],
                        "text": f"{STAGE_NAMES[stage['stage']]} is {stage['share']:.0%} of {focus['model']}'s chunk "
                        f"latency ({_ms(stage['mean_s'])} of {_ms(focus['mean_s'])} mean per chunk)",
                    }
                )
    for stage in report["saturation"]["stages"]:
        findings.append({"impact": min(1.0, stage["busy"]), "text": f"{stage['stage']} {stage['busy']:.0%} busy ({stage['detail']})"})
    for drop in report["drops"]:
        findings.append(
            {
                "impact": min(1.0, drop["share"]),
                "text": f"{drop['count']:.0f} {drop['modality']} chunks dropped ({drop['reason']}), "
                f"{drop['share']:.0%} of those read",
            }
        )
    for rejection in report["rejections"]:
        reason = rejection["reason"]
        cause = f"because {REASON_MEANINGS[reason]} ({reason})" if reason in REASON_MEANINGS else f"({reason})"
        findings.append(
            {
                "impact": min(1.0, rejection["share"]),
                "text": f"{rejection['count']:.0f} streams rejected {cause}, {rejection['share']:.0%} of new streams",
            }
        )
    for batch in report["batches"]:
        if batch["batches"] and batch["max_batch_size"] > 0:
            findings.append(
                {
                    "impact": batch["share_full"] * min(1.0, batch["busy"]),
                    "text": f"{batch['model']}: {batch['share_full']:.0%} of {batch['batches']:.0f} batches closed full "
                    f"at max_batch_size {batch['max_batch_size']:.0f}",
                }
            )
    findings.sort(key=lambda finding: -finding["impact"])
    return findings


# -- rendering -----------------------------------------------------------------


def _reason(reason: str) -> str:
    """Return a reason label with its meaning where the label alone could mislead, e.g. "draining (the server was shutting down)"."""
    meaning = REASON_MEANINGS.get(reason)
    return f"{reason} ({meaning})" if meaning else reason


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.1f} ms"


def render(report: dict[str, Any]) -> str:
    traffic = report["traffic"]
    verdict = report["verdict"]
    lines = [
        f"streaminfer diagnose: {report['url'] or 'snapshot'}, {report['interval_s']:.1f} s between scrapes",
        f"traffic: {traffic['chunks_received']:.0f} chunks read ({traffic['chunks_per_s']:.1f}/s), "
        f"{traffic['chunks_acked']:.0f} acked, {traffic['chunks_dropped']:.0f} dropped; "
        f"{traffic['streams_active']:.0f} streams open ({traffic['streams_paused']:.0f} paused), "
        f"{traffic['streams_started']:.0f} started, {traffic['streams_rejected']:.0f} rejected",
    ]
    if report["server_restarted"]:
        lines.append("note: a counter went down between the scrapes: the server restarted; figures cover the new process only")
    lines += ["", f"BOTTLENECK: {verdict['line']}", f"  -> {verdict['change']}"]
    if report["idle"]:
        return "\n".join(lines) + "\n"

    lines += ["", "Ranked findings (impact):"]
    for finding in report["findings"]:
        if finding["impact"] >= 0.005:
            lines.append(f"  {finding['impact']:4.0%}  {finding['text']}")

    lines += ["", "Where the latency goes (mean per chunk, largest first):"]
    if not report["latency"]:
        lines.append("  no chunk answered in the interval")
    for entry in report["latency"]:
        p50 = (">" if entry["p50_above_top_bucket"] else "") + _ms(entry["p50_s"])
        p99 = (">" if entry["p99_above_top_bucket"] else "") + _ms(entry["p99_s"])
        lines.append(
            f"  {entry['model']} ({entry['modality']}): {entry['chunks']:.0f} chunks, mean {_ms(entry['mean_s'])}, "
            f"p50 {p50}, p99 {p99}"
        )
        for stage in entry["stages"]:
            name = STAGE_NAMES[stage["stage"]]
            lines.append(f"    {name:<{STAGE_NAME_WIDTH}} {_ms(stage['mean_s']):>10}  {stage['share']:4.0%}")
        if entry["stages_exceed_latency"]:
            lines.append("    (the stage means add up to more than the latency: items per chunk or batch differ from one)")

    lines += ["", "Batches (per model):"]
    if not report["batches"]:
        lines.append("  no model ran a batch")
    for batch in report["batches"]:
        if not batch["batches"]:
            lines.append(f"  {batch['model']}: no batch in the interval")
            continue
        lines.append(
            f"  {batch['model']}: {batch['batches']:.0f} batches, mean size {batch['mean_batch_size']:.1f} of max "
            f"{batch['max_batch_size']:.0f} (fill {batch['mean_fill_ratio']:.0%}), closed by delay "
            f"{batch['share_delay']:.0%}, full {batch['share_full']:.0%}; inference {_ms(batch['inference_mean_s'])} per batch"
        )

    lines += ["", "Saturation (busiest first):"]
    for stage in report["saturation"]["stages"]:
        lines.append(f"  {stage['stage']:<28} {stage['busy']:4.0%}  {stage['detail']}")
    if report["saturation"]["max_busy_fraction"] <= 0:
        lines.append(
            f"  {'event loop busy fraction':<28}    -  not measured: admission.max_busy_fraction is 0, or /proc cannot be read"
        )

    lines += ["", "Drops by reason:"]
    lines += [
        f"  {drop['modality']} {drop['reason']}: {drop['count']:.0f} ({drop['share']:.0%} of chunks read)"
        for drop in report["drops"]
    ] or ["  none"]
    lines += ["Rejections by reason:"]
    lines += [
        f"  {_reason(rejection['reason'])}: {rejection['count']:.0f} ({rejection['share']:.0%} of new streams, "
        "admitted or rejected)"
        for rejection in report["rejections"]
    ] or ["  none"]
    ended = traffic["streams_ended_by_server"]
    if ended:
        lines += ["Streams ended by the server:"] + [f"  {_reason(entry['reason'])}: {entry['count']:.0f}" for entry in ended]
    return "\n".join(lines) + "\n"


# -- the command ---------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        help=f"the server's Prometheus page, as printed by serve (\"streaminfer metrics on ...\"); only this URL is "
        f"fetched, without proxies or redirects (default: {DEFAULT_URL})",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=DEFAULT_INTERVAL_S,
        metavar="SECONDS",
        help=f"seconds between the two scrapes; the report covers what happened between them "
        f"(default: {DEFAULT_INTERVAL_S:g})",
    )
    parser.add_argument("--save", metavar="FILE", help="also write both scrapes to FILE (JSON), to report on later with --snapshot")
    parser.add_argument(
        "--snapshot", metavar="FILE", help="report on scrapes saved with --save instead of reading a live server"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the report as JSON: times in seconds, shares and busy ratios from 0 to 1",
    )


DESCRIPTION = (
    "Read a running server's /metrics page twice, INTERVAL seconds apart, and report on what happened between: "
    "where chunk latency goes (mean per chunk in each stage; the rest is event loop/network), p50/p99 per model, "
    "batch fill, drops and rejections by reason, how busy model instances, decode threads, the event loop (its "
    "timer's lateness, and the busy fraction that admission checks) and the CPU are, and the bottleneck with the change that would help. Text output shows times in ms (or s) and shares "
    "in %; --json gives seconds and ratios. Progress goes to stderr."
)


def run(options: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """The diagnose command; returns the exit status."""
    try:
        if options.snapshot:
            if options.save:
                raise DiagnoseError("--save and --snapshot exclude each other: --snapshot reports on a file already saved")
            snapshot = load_snapshot(options.snapshot)
        else:
            if not (options.interval > 0 and math.isfinite(options.interval)):
                raise DiagnoseError(f"--interval {options.interval} is invalid: expected seconds > 0")

            def progress(line: str) -> None:
                print(line, file=err, flush=True)

            snapshot = take_snapshot(options.url, options.interval, progress)
            if options.save:
                try:
                    save_snapshot(snapshot, options.save)
                except OSError as error:
                    raise DiagnoseError(f"cannot write snapshot {options.save}: {error.strerror or error}") from error
                print(f"streaminfer diagnose: saved both scrapes to {options.save}", file=err, flush=True)
        report = diagnose(snapshot)
    except DiagnoseError as error:
        print(f"streaminfer diagnose: {error}", file=err)
        return 1
    if options.json:
        json.dump(report, out, indent=2)
        out.write("\n")
    else:
        out.write(render(report))
    return 0
