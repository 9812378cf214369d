"""The server's side of a run, from its Prometheus /metrics page read before and after.

Only histogram ``_sum`` and ``_count`` samples of three metrics are needed, so
without prometheus_client a few lines of parsing do.
"""

from __future__ import annotations

import re
import urllib.request
from typing import Any

__all__ = ["fetch", "parse", "server_breakdown"]

# (metric, what it means, scale to the unit reported)
_METRICS = {
    "streaminfer_queue_wait_seconds": ("mean_queue_wait_ms", 1000.0),
    "streaminfer_inference_seconds": ("mean_inference_per_batch_ms", 1000.0),
    "streaminfer_batch_size": ("mean_batch_size", 1.0),
}
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)')
_MODEL_LABEL = re.compile(r'(?:^|,)\s*model="((?:[^"\\]|\\.)*)"')


def fetch(url: str, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - the user's own URL
        return response.read().decode("utf-8", "replace")


def parse(text: str) -> dict[tuple[str, str], float]:
    """Return ``{(sample name, model): value}`` for the ``_sum`` and ``_count`` samples of the wanted metrics."""
    samples: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        base, _, suffix = name.rpartition("_")
        if base not in _METRICS or suffix not in ("sum", "count"):
            continue
        model_match = _MODEL_LABEL.search(labels or "")
        model = model_match.group(1) if model_match else ""
        try:
            samples[(name, model)] = samples.get((name, model), 0.0) + float(value)
        except ValueError:
            continue
    return samples


def server_breakdown(before: str, after: str) -> dict[str, dict[str, Any]]:
    """Per model, the mean queue wait, inference time per batch and batch size over the run."""
    first, last = parse(before), parse(after)
    models = sorted({model for (_, model) in last})
    report: dict[str, dict[str, Any]] = {}
    for model in models:
        row: dict[str, Any] = {}
        for metric, (label, scale) in _METRICS.items():
            count = last.get((metric + "_count", model), 0.0) - first.get((metric + "_count", model), 0.0)
            total = last.get((metric + "_sum", model), 0.0) - first.get((metric + "_sum", model), 0.0)
            row[label] = total / count * scale if count > 0 else None
            if metric == "streaminfer_batch_size":
                row["batches"] = int(count)
        if row.get("batches"):
            report[model] = row
    return report
