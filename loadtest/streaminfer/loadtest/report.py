"""The end of a run: the summary table, the JSON report and the figure."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from streaminfer.loadtest.stats import Recorder, percentiles_ms

__all__ = ["build_report", "format_summary", "write_plot"]

# The last third's mean latency counts as growing when it is at least LAG_CHANGE_RATIO times the first
# third's and LAG_CHANGE_MIN_MS higher, and as falling when the first third's is. The minimum keeps small
# changes, such as 2 ms to 4 ms, steady. NOTE: both are chosen margins, not measured ones.
LAG_CHANGE_RATIO = 1.5
LAG_CHANGE_MIN_MS = 5.0


def lag_trend(first_ms: float | None, last_ms: float | None) -> str:
    """Return "growing", "falling" or "steady" for the mean latency of the first and last third, or "no data"."""
    if first_ms is None or last_ms is None:
        return "no data"
    if last_ms >= LAG_CHANGE_RATIO * first_ms and last_ms - first_ms >= LAG_CHANGE_MIN_MS:
        return "growing"
    if first_ms >= LAG_CHANGE_RATIO * last_ms and first_ms - last_ms >= LAG_CHANGE_MIN_MS:
        return "falling"
    return "steady"


def build_report(
    recorder: Recorder,
    settings: dict[str, Any],
    wall_s: float,
    offered: dict[str, Any],
    ramp: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
) -> dict[str, Any]:
    c = recorder.counters
    first_third, last_third = recorder.lag_thirds_ms()
    growth = None if first_third is None or last_third is None else last_third - first_third
    trend = lag_trend(first_third, last_third)
    per_second = {
        str(second): percentiles_ms(histogram) | {"chunks": histogram.get_total_count()}
        for second, histogram in sorted(recorder.latency_by_second.items())
    }
    streams_done = c["streams_opened"] + c["streams_failed"]
    return {
        "settings": settings,
        "wall_seconds": wall_s,
        "offered": offered,
        "counts": dict(c),
        "chunk_latency_ms": percentiles_ms(recorder.latency),
        "chunk_latency_ms_by_modality": {k: percentiles_ms(v) for k, v in recorder.latency_by_modality.items()},
        "time_to_first_result_ms": percentiles_ms(recorder.first_result),
        "stream_setup_ms": percentiles_ms(recorder.setup),
        "send_lateness_ms": percentiles_ms(recorder.send_lateness),
        "lag": {
            "mean_latency_first_third_ms": first_third,
            "mean_latency_last_third_ms": last_third,
            "growth_ms": growth,
            "trend": trend,
            "growing": trend == "growing",
            # Growing by more than half the budget over the run means the server falls behind real time.
            "growth_over_half_budget": trend == "growing" and growth is not None and growth > recorder.budget_ms / 2,
        },
        "messages_per_second": {
            "sent": c["requests_sent"] / wall_s if wall_s > 0 else None,
            "received": c["events_received"] / wall_s if wall_s > 0 else None,
        },
        "status_codes": dict(recorder.status_codes),
        "status_messages": dict(recorder.status_messages),
        "drop_reasons": dict(recorder.drop_reasons),
        "goodput": {
            "budget_ms": recorder.budget_ms,
            "warmup_s": settings.get("warmup_s", 0.0),
            "streams": streams_done,
            "good_streams": c["streams_good"],
            "good_fraction": c["streams_good"] / streams_done if streams_done else None,
            "good_streams_per_s": c["streams_good"] / wall_s if wall_s > 0 else None,
        },
        "latency_by_second_ms": per_second,
        "ramp": ramp,
        "server": server,
        "histograms": recorder.to_wire(),
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _lag_line(lag: dict[str, Any], budget_ms: float) -> str:
    """Return the summary line on the mean latency of the first and last third of the run, with its trend."""
    first, last = lag["mean_latency_first_third_ms"], lag["mean_latency_last_third_ms"]
    trend = lag["trend"]
    if trend == "no data":
        return "lag: no data, because fewer than 3 seconds of the run have answered chunks"
    if trend in ("growing", "falling"):
        trend += f" by {abs(last - first):.1f} ms"
    if lag["growth_over_half_budget"]:
        trend += f", over half the {budget_ms:g} ms budget: the server falls behind real time"
    return f"lag: mean latency {_ms(first)} ms in the first third, {_ms(last)} ms in the last third ({trend})"


def format_summary(report: dict[str, Any]) -> str:
    c = report["counts"]
    lines = []
    offered = report["offered"]
    lines.append(f"load: {offered['description']}, {report['wall_seconds']:.1f} s wall time")
    lines.append(
        f"streams: {c['streams_planned']} planned, {c['streams_opened']} opened, {c['streams_failed']} failed at setup, "
        f"{c['streams_good']} met the {report['goodput']['budget_ms']:g} ms budget on every chunk"
        + (f" after the first {report['goodput']['warmup_s']:g} s" if report["goodput"].get("warmup_s") else "")
    )
    lines.append(
        f"chunks: {c['chunks_sent']} sent = {c['chunks_acked']} acked + {c['chunk_errors']} errors + "
        f"{c['chunks_unanswered']} unanswered; {c['chunks_over_budget']} over budget; {c['results']} results"
    )

    lines.append("")
    lines.append(f"{'ms':<34}{'p50':>9}{'p90':>9}{'p99':>9}{'p99.9':>9}{'max':>9}{'mean':>9}")
    rows = [("chunk latency (scheduled -> ack)", report["chunk_latency_ms"])]
    if len(report["chunk_latency_ms_by_modality"]) > 1:
        rows += [(f"  {kind}", values) for kind, values in sorted(report["chunk_latency_ms_by_modality"].items())]
    rows += [
        ("time to first result", report["time_to_first_result_ms"]),
        ("stream setup (scheduled -> accept)", report["stream_setup_ms"]),
        ("send lateness (client side)", report["send_lateness_ms"]),
    ]
    for name, values in rows:
        cells = "".join(f"{_ms(values[key]):>9}" for key in ("p50", "p90", "p99", "p99.9", "max", "mean"))
        lines.append(f"{name:<34}{cells}")

    lines.append("")
    lines.append(_lag_line(report["lag"], report["goodput"]["budget_ms"]))
    rates = report["messages_per_second"]
    lines.append(f"messages/s: {_ms(rates['sent'])} sent (config + chunks), {_ms(rates['received'])} events received (results, acks, errors, stream ends)")
    lines.append("status codes: " + (", ".join(f"{k} {v}" for k, v in sorted(report["status_codes"].items())) or "-"))
    for status, message in sorted(report.get("status_messages", {}).items()):
        lines.append(f"  first {status}: {message}")
    lines.append("drop reasons: " + (", ".join(f"{k} {v}" for k, v in sorted(report["drop_reasons"].items())) or "-"))
    goodput = report["goodput"]
    fraction = goodput["good_fraction"]
    lines.append(
        f"goodput: {goodput['good_streams']} of {goodput['streams']} streams "
        f"({'-' if fraction is None else f'{100 * fraction:.0f} %'}) at offered {offered['description']}"
    )

    ramp = report.get("ramp")
    if ramp:
        lines.append("")
        lines.append("ramp (a step passes with under 1 % of its chunks over budget, unanswered ones past the budget counted as over):")
        for level in ramp["levels"]:
            lines.append(
                f"  {level['concurrency']:>6} streams: p99 {_ms(level['p99_ms'])} ms, {level['over_budget']} over + "
                f"{level['unanswered_over_budget']} unanswered past the budget of {level['chunks']} chunks "
                f"-> {'passed' if level['passed'] else 'BROKE'}"
            )
        lines.append(f"  last concurrency that passed: {ramp['last_passing_concurrency'] if ramp['last_passing_concurrency'] is not None else 'none'}")

    server = report.get("server")
    if server:
        lines.append("")
        lines.append(f"server side ({'over the run' if 'error' not in server else server['error']}):")
        for model, row in sorted(server.get("models", {}).items()):
            lines.append(
                f"  {model}: mean queue wait {_ms(row['mean_queue_wait_ms'])} ms, inference {_ms(row['mean_inference_per_batch_ms'])} ms "
                f"per batch, mean batch size {_ms(row['mean_batch_size'])} over {row['batches']} batches"
            )
    return "\n".join(lines)


def write_json(path: str | pathlib.Path, report: dict[str, Any]) -> None:
    pathlib.Path(path).write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


def write_plot(path: str | pathlib.Path, report: dict[str, Any]) -> None:
    """Latency over time (p50, p99, max per second) and, for a ramp, p99 against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ramp = report.get("ramp")
    panels = 2 if ramp else 1
    figure, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), squeeze=False)
    seconds = sorted(report["latency_by_second_ms"], key=int)
    x = [int(s) for s in seconds]
    ax = axes[0][0]
    for key, style in (("p50", "-"), ("p99", "-"), ("max", ":")):
        ax.plot(x, [report["latency_by_second_ms"][s][key] for s in seconds], style, label=key)
    ax.axhline(report["goodput"]["budget_ms"], color="red", linewidth=0.8, label="budget")
    ax.set_xlabel("scheduled send time (s since start)")
    ax.set_ylabel("chunk latency (ms)")
    ax.set_title("latency over time")
    ax.legend()
    if ramp:
        ax = axes[0][1]
        levels = ramp["levels"]
        ax.plot([lv["concurrency"] for lv in levels], [lv["p99_ms"] for lv in levels], "o-", label="p99")
        ax.axhline(report["goodput"]["budget_ms"], color="red", linewidth=0.8, label="budget")
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("p99 chunk latency (ms)")
        ax.set_title("latency against load")
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
