"""Benchmark: what metrics and tracing cost, measured side by side in one run.

Two servers, started one after the other and alternated ``--rounds`` times:

- observed: the defaults. Metrics are recorded and served on a port (the
  benchmark scrapes the page once a second, as Prometheus would), and
  tracing is on, exporting over OTLP/gRPC to a receiver this script runs on
  loopback, with the default chunk sample ratio (0.01) and every stream traced.
- bare: ``--metrics-port -1`` (no metric is recorded) and no OTEL_* variables.

``--modes`` adds ``metrics`` (metrics only) and ``tracing`` (tracing only),
to tell the two costs apart.

Each round measures saturation throughput (VAD windows per second, as in
``vad_streams.py``) and real-time latency (p50 and p99 per chunk), with the
server's CPU time per real-time chunk, which noise from other processes
moves less than latency. The
figures go to stdout, bench-results/observability_cost.json and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import json
import os
import pathlib
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from goodput import write_markdown  # noqa: E402
from vad_streams import REPO_ROOT, config_without_admission, machine_description, realtime_load, saturation_load, start_server  # noqa: E402

RESULTS = REPO_ROOT / "bench-results"
SECTION_START = "<!-- observability:start -->"
SECTION_END = "<!-- observability:end -->"
SCRAPE_INTERVAL_S = 1.0


class SpanSink:
    """An OTLP/gRPC trace receiver on loopback that counts the spans it gets."""

    def __init__(self) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        sink = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                count = sum(len(scope.spans) for spans in request.resource_spans for scope in spans.scope_spans)
                with sink._lock:
                    sink.spans += count
                return trace_service_pb2.ExportTraceServiceResponse()

        self.spans = 0
        self._lock = threading.Lock()
        self._server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=None)


class Scraper:
    """Reads a /metrics page every SCRAPE_INTERVAL_S on a thread, as a Prometheus server would."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.scrapes = 0
        self.page_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_INTERVAL_S):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    self.page_bytes = len(response.read())
                self.scrapes += 1
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def run_round(mode: str, config_path: pathlib.Path, sink: SpanSink, options: argparse.Namespace) -> dict:
    import uvloop

    tracing_variables = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    with_metrics = mode in ("observed", "metrics")
    with_tracing = mode in ("observed", "tracing")
    for name in tracing_variables:
        os.environ.pop(name, None)
    if with_tracing:
        os.environ.update(tracing_variables)
    args = ["--config", str(config_path)]
    if not with_metrics:
        args += ["--metrics-port", "-1"]
    spans_before = sink.spans
    server = start_server(args)
    scraper = None
    try:
        # The metrics line follows the ready line; the server's reader thread collects it.
        deadline = time.monotonic() + 10
        while with_metrics and scraper is None and time.monotonic() < deadline:
            for line in list(server.log):
                if line.startswith("streaminfer metrics on http://"):
                    scraper = Scraper(line.split("metrics on ", 1)[1].strip())
            time.sleep(0.05)
        if with_metrics and scraper is None:
            raise RuntimeError("the observed server printed no metrics address")
        target = f"127.0.0.1:{server.port}"
        print(f"{mode}: saturation, {options.saturation_streams} streams ...", flush=True)
        saturation = uvloop.run(saturation_load(target, options.saturation_streams, 16, 2, options.warmup, options.seconds))
        print(f"  {saturation['windows_per_second']:.0f} windows/s", flush=True)
        print(f"{mode}: real time, {options.streams} streams ...", flush=True)
        cpu_before = server.cpu_seconds()
        realtime = uvloop.run(realtime_load(target, options.streams, 32, options.warmup, options.seconds))
        chunks = options.streams * int((options.warmup + options.seconds) / 0.032)
        cpu_us_per_chunk = (server.cpu_seconds() - cpu_before) / chunks * 1e6
        print(
            f"  p50 {realtime['p50_ms']:.1f} ms, p99 {realtime['p99_ms']:.1f} ms, {cpu_us_per_chunk:.0f} us of server CPU "
            "per chunk",
            flush=True,
        )
    finally:
        if scraper is not None:
            scraper.stop()
        server.stop()
    for name in tracing_variables:
        os.environ.pop(name, None)
    return {
        "mode": mode,
        "windows_per_second": saturation["windows_per_second"],
        "saturation_errors": saturation["chunk_errors"],
        "p50_ms": realtime["p50_ms"],
        "p99_ms": realtime["p99_ms"],
        "realtime_errors": realtime["chunk_errors"],
        "server_cpu_us_per_chunk": cpu_us_per_chunk,
        "scrapes": scraper.scrapes if scraper else 0,
        "metrics_page_bytes": scraper.page_bytes if scraper else 0,
        # The server flushes its spans when it stops, so they count here.
        "spans_exported": sink.spans - spans_before,
    }


def summarize(rounds: list[dict]) -> dict:
    summary: dict = {}
    for mode in dict.fromkeys(row["mode"] for row in rounds):
        rows = [row for row in rounds if row["mode"] == mode]
        summary[mode] = {
            "windows_per_second": statistics.mean(row["windows_per_second"] for row in rows),
            "p50_ms": statistics.median(row["p50_ms"] for row in rows),
            "p99_ms": statistics.median(row["p99_ms"] for row in rows),
            "server_cpu_us_per_chunk": statistics.median(row["server_cpu_us_per_chunk"] for row in rows),
        }
    summary["throughput_ratio"] = summary["observed"]["windows_per_second"] / summary["bare"]["windows_per_second"]
    summary["cpu_ratio"] = summary["observed"]["server_cpu_us_per_chunk"] / summary["bare"]["server_cpu_us_per_chunk"]
    return summary


def markdown(report: dict) -> str:
    summary = report["summary"]
    lines = [
        SECTION_START,
        "## Cost of metrics and tracing",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}  ",
        f"Date: {report['date']}",
        "",
        "Observed: the defaults, with metrics recorded and scraped once a second, and tracing exporting over "
        "OTLP/gRPC to a receiver on loopback (every stream traced, stage spans for 1 % of chunks). Bare: "
        "`--metrics-port -1`, which records no metric, and no OTEL_* variables. The two alternate, "
        f"{report['rounds']} rounds each; saturation is {report['saturation_streams']} streams keeping 2 chunks of "
        f"16 VAD windows in flight, real time is {report['streams']} streams of 32 ms chunks, {report['seconds']:g} s "
        "measured per phase. The load generator shares the 2 cores.",
        "",
        "| round | server | saturation windows/s | real-time p50 ms | real-time p99 ms | server CPU us per chunk "
        "| spans exported | scrapes |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    per_round = len(report["modes"])
    for index, row in enumerate(report["rounds_detail"]):
        lines.append(
            f"| {index // per_round + 1} | {row['mode']} | {row['windows_per_second']:.0f} | {row['p50_ms']:.1f} | "
            f"{row['p99_ms']:.1f} | {row['server_cpu_us_per_chunk']:.0f} | {row['spans_exported']} | {row['scrapes']} |"
        )
    lines += [
        "",
        f"Mean saturation throughput: observed {summary['observed']['windows_per_second']:.0f}, bare "
        f"{summary['bare']['windows_per_second']:.0f} windows/s; observed / bare = {summary['throughput_ratio']:.3f} "
        f"(cost {100 * (1 - summary['throughput_ratio']):.1f} %). Median real-time p99: observed "
        f"{summary['observed']['p99_ms']:.1f} ms, bare {summary['bare']['p99_ms']:.1f} ms. Median server CPU per "
        f"real-time chunk: observed {summary['observed']['server_cpu_us_per_chunk']:.0f} us, bare "
        f"{summary['bare']['server_cpu_us_per_chunk']:.0f} us (observed / bare = {summary['cpu_ratio']:.3f}).",
        SECTION_END,
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each running every mode once (default: 3)")
    parser.add_argument(
        "--modes",
        default="observed,bare",
        help="servers per round, in order: observed, bare, metrics (metrics only), tracing (tracing only); "
        "observed and bare are required (default: observed,bare)",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per phase (default: 8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first, per phase (default: 2)")
    parser.add_argument("--streams", type=int, default=100, help="real-time streams (default: 100)")
    parser.add_argument("--saturation-streams", type=int, default=128, help="saturating streams (default: 128)")
    parser.add_argument("--json", type=pathlib.Path, default=RESULTS / "observability_cost.json")
    parser.add_argument("--markdown", type=pathlib.Path, default=REPO_ROOT / "BENCHMARKS.md")
    options = parser.parse_args()

    modes = [mode.strip() for mode in options.modes.split(",") if mode.strip()]
    if not {"observed", "bare"} <= set(modes) or not set(modes) <= {"observed", "bare", "metrics", "tracing"}:
        parser.error(f"--modes {options.modes!r}: expected observed and bare, optionally metrics and tracing")
    sink = SpanSink()
    rounds = []
    try:
        with tempfile.TemporaryDirectory() as folder:
            config_path = pathlib.Path(folder) / "server.toml"
            config_path.write_text(config_without_admission())
            for index in range(options.rounds):
                print(f"round {index + 1} of {options.rounds}", flush=True)
                for mode in modes:
                    rounds.append(run_round(mode, config_path, sink, options))
    finally:
        sink.stop()

    report = {
        "command": "python benchmarks/observability_cost.py " + " ".join(sys.argv[1:]),
        "machine": machine_description(),
        "date": datetime.date.today().isoformat(),
        "rounds": options.rounds,
        "modes": modes,
        "seconds": options.seconds,
        "streams": options.streams,
        "saturation_streams": options.saturation_streams,
        "rounds_detail": rounds,
        "summary": summarize(rounds),
    }
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(options.markdown, markdown(report), SECTION_START, SECTION_END)
    summary = report["summary"]
    print(
        f"observed / bare throughput {summary['throughput_ratio']:.3f}; p99 observed {summary['observed']['p99_ms']:.1f} ms, "
        f"bare {summary['bare']['p99_ms']:.1f} ms; wrote {options.json} and {options.markdown}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
