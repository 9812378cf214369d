"""Run measurements: HDR histograms and counters that merge across processes."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from hdrh.histogram import HdrHistogram

__all__ = ["PERCENTILES", "Recorder", "new_histogram", "percentiles_ms"]

# Values are recorded in microseconds, from 1 us to one hour, to 3 significant digits.
_LOWEST_US = 1
_HIGHEST_US = 3_600_000_000
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def new_histogram(digits: int = 3) -> HdrHistogram:
    return HdrHistogram(_LOWEST_US, _HIGHEST_US, digits)


def record_s(histogram: HdrHistogram, seconds: float) -> None:
    """Record ``seconds`` in microseconds, clamped to the histogram's range."""
    histogram.record_value(min(_HIGHEST_US, max(_LOWEST_US, round(seconds * 1e6))))


def percentiles_ms(histogram: HdrHistogram) -> dict[str, float | None]:
    """p50, p90, p99, p99.9, max and mean in milliseconds; None for an empty histogram."""
    keys = [f"p{p:g}" for p in PERCENTILES] + ["max", "mean"]
    if histogram.get_total_count() == 0:
        return {key: None for key in keys}
    values = [histogram.get_value_at_percentile(p) / 1000.0 for p in PERCENTILES]
    values += [histogram.get_max_value() / 1000.0, histogram.get_mean_value() / 1000.0]
    return dict(zip(keys, values, strict=True))


def _encode(histogram: HdrHistogram) -> str:
    return histogram.encode().decode("ascii")


def _decode(text: str) -> HdrHistogram:
    return HdrHistogram.decode(text.encode("ascii"))


_COUNTERS = (
    "streams_planned",
    "streams_opened",
    "streams_failed",
    "streams_good",
    "chunks_sent",
    "chunks_acked",
    "chunk_errors",
    "chunks_unanswered",
    "chunks_over_budget",
    "results",
    "requests_sent",
    "events_received",
)


@dataclasses.dataclass
class Recorder:
    """Everything one process measured. ``merge`` adds another process's figures."""

    budget_ms: float = 100.0
    counters: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0))
    # Per-chunk latency: the chunk's scheduled send time to the ack that covers it.
    latency: HdrHistogram = dataclasses.field(default_factory=new_histogram)
    latency_by_modality: dict[str, HdrHistogram] = dataclasses.field(default_factory=dict)
    # The stream's scheduled start to its first result.
    first_result: HdrHistogram = dataclasses.field(default_factory=new_histogram)
    # The stream's scheduled start to SessionAccepted.
    setup: HdrHistogram = dataclasses.field(default_factory=new_histogram)
    # How late the sender wrote each chunk after its scheduled time (the client's own lag).
    send_lateness: HdrHistogram = dataclasses.field(default_factory=new_histogram)
    # Latency by the whole second of the chunk's scheduled time since the run's start.
    latency_by_second: dict[int, HdrHistogram] = dataclasses.field(default_factory=dict)
    # Latency by ramp step (index into the ramp's levels).
    latency_by_level: dict[int, HdrHistogram] = dataclasses.field(default_factory=dict)
    # Stream outcomes by gRPC status name ("OK" for a stream that ended normally).
    status_codes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    # The server's message of the first stream that ended with each status other than OK.
    status_messages: dict[str, str] = dataclasses.field(default_factory=dict)
    # ChunkError reasons from the server, and UNANSWERED for chunks with neither ack nor error at the end.
    drop_reasons: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def count_status(self, status: str, message: str = "") -> None:
        """Count a stream's outcome, keeping the first message of each status other than OK."""
        self.status_codes[status] += 1
        if message and status != "OK":
            self.status_messages.setdefault(status, message)

    def record_latency(self, modality: str, seconds: float, second_index: int, level: int | None = None) -> None:
        record_s(self.latency, seconds)
        if modality not in self.latency_by_modality:
            self.latency_by_modality[modality] = new_histogram()
        record_s(self.latency_by_modality[modality], seconds)
        if second_index not in self.latency_by_second:
            self.latency_by_second[second_index] = new_histogram(2)
        record_s(self.latency_by_second[second_index], seconds)
        if level is not None:
            if level not in self.latency_by_level:
                self.latency_by_level[level] = new_histogram()
            record_s(self.latency_by_level[level], seconds)
        if seconds * 1000.0 > self.budget_ms:
            self.counters["chunks_over_budget"] += 1

    def merge(self, other: Recorder) -> None:
        for name, value in other.counters.items():
            self.counters[name] = self.counters.get(name, 0) + value
        self.latency.add(other.latency)
        self.first_result.add(other.first_result)
        self.setup.add(other.setup)
        self.send_lateness.add(other.send_lateness)
        for target, source, digits in (
            (self.latency_by_modality, other.latency_by_modality, 3),
            (self.latency_by_second, other.latency_by_second, 2),
            (self.latency_by_level, other.latency_by_level, 3),
        ):
            for key, histogram in source.items():
                if key not in target:
                    target[key] = new_histogram(digits)
                target[key].add(histogram)
        self.status_codes.update(other.status_codes)
        for status, message in other.status_messages.items():
            self.status_messages.setdefault(status, message)
        self.drop_reasons.update(other.drop_reasons)

    def lag_thirds_ms(self) -> tuple[float | None, float | None]:
        """Mean chunk latency over the first and the last third of the run's seconds, in ms."""
        seconds = sorted(self.latency_by_second)
        if len(seconds) < 3:
            return None, None
        third = len(seconds) // 3

        def mean(keys: list[int]) -> float | None:
            total = sum(self.latency_by_second[k].get_total_count() for k in keys)
            if total == 0:
                return None
            weighted = sum(self.latency_by_second[k].get_mean_value() * self.latency_by_second[k].get_total_count() for k in keys)
            return weighted / total / 1000.0

        return mean(seconds[:third]), mean(seconds[-third:])

    # Serialisation for worker processes and the JSON report.

    def to_wire(self) -> dict[str, Any]:
        return {
            "budget_ms": self.budget_ms,
            "counters": dict(self.counters),
            "latency": _encode(self.latency),
            "latency_by_modality": {k: _encode(v) for k, v in self.latency_by_modality.items()},
            "first_result": _encode(self.first_result),
            "setup": _encode(self.setup),
            "send_lateness": _encode(self.send_lateness),
            "latency_by_second": {str(k): _encode(v) for k, v in self.latency_by_second.items()},
            "latency_by_level": {str(k): _encode(v) for k, v in self.latency_by_level.items()},
            "status_codes": dict(self.status_codes),
            "status_messages": dict(self.status_messages),
            "drop_reasons": dict(self.drop_reasons),
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Recorder:
        recorder = cls(budget_ms=data["budget_ms"])
        recorder.counters.update(data["counters"])
        recorder.latency = _decode(data["latency"])
        recorder.latency_by_modality = {k: _decode(v) for k, v in data["latency_by_modality"].items()}
        recorder.first_result = _decode(data["first_result"])
        recorder.setup = _decode(data["setup"])
        recorder.send_lateness = _decode(data["send_lateness"])
        recorder.latency_by_second = {int(k): _decode(v) for k, v in data["latency_by_second"].items()}
        recorder.latency_by_level = {int(k): _decode(v) for k, v in data["latency_by_level"].items()}
        recorder.status_codes.update(data["status_codes"])
        recorder.status_messages.update(data.get("status_messages", {}))
        recorder.drop_reasons.update(data["drop_reasons"])
        return recorder
