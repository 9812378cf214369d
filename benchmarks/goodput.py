"""Benchmark: latency and goodput against offered load, with admission control on and off.

Each offered load is a number of real-time VAD streams, opened over
``--ramp-s`` seconds, each running ``--duration-s`` seconds. They open in
order, ten to a connection, so the streams admitted share connections alike
at every offered load. Per stream, the load generator records whether it was
admitted and the latency of every chunk from its scheduled send time to its
ChunkAck. A process of its own calls the health check every 0.1 s and times
each call. A stream meets its budget when it was admitted, every chunk was
acknowledged, and at least 99 % of its chunks were acknowledged within
``--budget-ms``. Goodput is the number of streams that met their budget. A
rejected stream's rejection time runs from its call to the status, as the
load generator sees it.

Before every offered load, with the server idle, the benchmark times a
fixed pure-Python loop (milliseconds a round; lower is faster). The table
gives the machine's speed then as the fastest probe of the run over this
one. While idle, the 2-core test machine (a shared virtual machine) ran such
a loop up to 1.7 times slower for several seconds at a time. A probe shows
such a slow spell only if it has begun when the level starts.

Three servers run the same sweep, one after the other, on this machine:

- admission on: ``admission.max_streams`` = ``--max-streams``, sized from
  this benchmark, and load shedding at ``--max-queue-wait-ms`` of projected
  queue wait. The busy-fraction check is off unless ``--on-max-busy-fraction``
  sets a limit for it beside the cap.
- shedding only: no configured stream cap, load shedding at
  ``--max-busy-fraction`` (the server's default) of projected busy fraction
  and at ``--max-queue-wait-ms`` (the server's default is 250) of projected
  queue wait;
- admission off: no stream cap and no load shedding.

A rejected stream is not retried: on a real deployment it would go to
another replica. Results go to stdout, bench-results/goodput.json, an SVG
plot bench-results/goodput.svg, and a section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import pathlib
import re
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
from streaminfer.server.config import AdmissionConfig

from vad_streams import (
    REPO_ROOT,
    VAD_RATE,
    load_speech_16k,
    machine_description,
    read_answers,
    send_realtime,
    start_server,
)

RESULTS = REPO_ROOT / "bench-results"
HEALTH_PROBE_INTERVAL_S = 0.1
HEALTH_PROBE_SCRIPT = pathlib.Path(__file__).with_name("health_probe.py")
RSS_SAMPLE_INTERVAL_S = 0.5
BUSY_SAMPLE_INTERVAL_S = 0.5
# The speed probe: rounds of a fixed loop, this many additions each, a pause between rounds.
SPEED_PROBE_ROUNDS = 9
SPEED_PROBE_ADDITIONS = 100_000
SPEED_PROBE_PAUSE_S = 0.02
STREAMS_PER_CONNECTION = 10
# The admission-on server's stream cap unless --max-streams sets another, sized from an earlier sweep.
DEFAULT_MAX_STREAMS = 190
SECTION_START = "<!-- goodput:start -->"
SECTION_END = "<!-- goodput:end -->"


MODES = {"on": "admission on", "shed": "shedding only", "off": "admission off"}


def server_config(
    mode: str, max_streams: int, max_queue_wait_ms: float, max_busy_fraction: float, on_max_busy_fraction: float = 0.0
) -> str:
    """Return the TOML config of the served VAD model for one admission mode."""
    shedding = f"max_queue_wait_ms = {max_queue_wait_ms}\nmax_busy_fraction = {max_busy_fraction}\n"
    if mode == "on":
        admission_table = (
            f"max_streams = {max_streams}\nmax_queue_wait_ms = {max_queue_wait_ms}\n"
            f"max_busy_fraction = {on_max_busy_fraction}\n"
        )
    elif mode == "shed":
        admission_table = f"max_streams = 100000\n{shedding}"
    else:
        admission_table = "max_streams = 100000\nmax_queue_wait_ms = 0\nmax_busy_fraction = 0\n"
    return f"""
[admission]
{admission_table}retry_pushback_ms = 1000

[[models]]
name = "silero_vad"
batching = {{ max_batch_size = 256, max_queue_delay_ms = 4.0 }}
"""


async def offered_load(
    target: str, streams: int, ramp_s: float, duration_s: float, warmup_s: float, budget_s: float, chunk_ms: int
) -> dict:
    """Open ``streams`` real-time VAD streams over ``ramp_s`` seconds and measure each one."""
    import grpc

    from streaminfer.v1 import streaminfer_pb2 as pb
    from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

    speech = load_speech_16k()
    chunk_samples = VAD_RATE * chunk_ms // 1000
    interval = chunk_ms / 1000.0
    total_chunks = int(duration_s / interval)
    warmup_chunks = int(warmup_s / interval)
    loop = asyncio.get_running_loop()
    outcomes: list[dict] = []
    all_latencies: list[float] = []

    async def one_stream(index: int, stub: pb_grpc.InferenceServiceStub, open_at: float) -> None:
        await asyncio.sleep(max(0.0, open_at - loop.time()))
        outcome = {"admitted": False, "met_budget": False, "rejected_code": None}
        outcomes.append(outcome)
        call_started = time.perf_counter()
        call = stub.Stream()
        try:
            await call.write(
                pb.StreamRequest(
                    config=pb.StreamConfig(
                        models=[pb.ModelSelection(model="silero_vad")],
                        audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=VAD_RATE),
                    )
                )
            )
            first = await call.read()
        except grpc.aio.AioRpcError as error:
            outcome["rejected_code"] = error.code().name
            outcome["rejected_details"] = error.details()
            outcome["rejected_after_s"] = time.perf_counter() - call_started
            return
        if first is grpc.aio.EOF:
            outcome["rejected_code"] = (await call.code()).name
            outcome["rejected_after_s"] = time.perf_counter() - call_started
            return
        outcome["admitted"] = True
        start = loop.time()
        scheduled: dict[int, float] = {}
        latencies: list[float] = []
        answered = errors = 0

        sender = asyncio.create_task(
            send_realtime(call, pb, speech, index, start, interval, total_chunks, chunk_samples, scheduled)
        )
        try:
            answered, errors = await read_answers(call, scheduled, start + warmup_chunks * interval, latencies)
            await sender
        except grpc.aio.AioRpcError as error:
            sender.cancel()
            outcome["failed_code"] = error.code().name
        within = sum(1 for latency in latencies if latency <= budget_s)
        outcome["chunks"] = total_chunks
        outcome["answered"] = answered
        outcome["chunk_errors"] = errors
        outcome["met_budget"] = (
            answered == total_chunks and errors == 0 and bool(latencies) and within >= 0.99 * len(latencies)
        )
        all_latencies.extend(latencies)

    options = [("grpc.max_receive_message_length", 16 << 20)]
    # Streams open in order, STREAMS_PER_CONNECTION to a connection, so the
    # streams admitted share connections alike at every offered load.
    connections = -(-streams // STREAMS_PER_CONNECTION)
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(connections)]
    stubs = [pb_grpc.InferenceServiceStub(channel) for channel in channels]
    # The health probe is a process of its own, as a load balancer's would
    # be, so this process's busy event loop does not add to its times. Its
    # first check, on an idle server, opens its connection and is not counted.
    prober = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HEALTH_PROBE_SCRIPT),
        target,
        "--interval-s",
        str(HEALTH_PROBE_INTERVAL_S),
        "--max-s",
        str(ramp_s + duration_s + 60.0),
        stdout=asyncio.subprocess.PIPE,
    )
    if not await prober.stdout.readline():
        code = await prober.wait()
        raise RuntimeError(f"the health probe {HEALTH_PROBE_SCRIPT.name} exited with code {code} before its first check")
    begin = loop.time() + 0.5
    await asyncio.gather(
        *(
            one_stream(i, stubs[i // STREAMS_PER_CONNECTION], begin + ramp_s * i / streams)
            for i in range(streams)
        )
    )
    prober.terminate()
    probe_output, _ = await prober.communicate()
    for channel in channels:
        await channel.close()
    # A line cut short by the probe's SIGTERM has no status and is left out.
    checks = [line.split(" ", 1) for line in probe_output.decode().splitlines() if " " in line]
    health = np.array([float(milliseconds) for milliseconds, _ in checks])
    health_failures = sum(1 for _, status in checks if status != "SERVING")
    values = np.array(all_latencies) * 1000.0
    rejection_ms = np.array([outcome["rejected_after_s"] for outcome in outcomes if "rejected_after_s" in outcome]) * 1000.0
    admitted = sum(1 for outcome in outcomes if outcome["admitted"])
    rejected: dict[str, int] = {}
    for outcome in outcomes:
        if outcome["rejected_code"]:
            rejected[outcome["rejected_code"]] = rejected.get(outcome["rejected_code"], 0) + 1
    unexpected = sorted(
        {outcome["rejected_details"] for outcome in outcomes if outcome.get("rejected_code") not in (None, "UNAVAILABLE")}
    )
    return {
        "unexpected_rejections": unexpected[:5],
        "offered": streams,
        "admitted": admitted,
        "rejected": rejected,
        "goodput": sum(1 for outcome in outcomes if outcome["met_budget"]),
        "failed_streams": sum(1 for outcome in outcomes if "failed_code" in outcome),
        "chunk_errors": sum(outcome.get("chunk_errors", 0) for outcome in outcomes),
        "p50_ms": float(np.percentile(values, 50)) if len(values) else None,
        "p99_ms": float(np.percentile(values, 99)) if len(values) else None,
        "health_checks": len(health),
        "health_failures": health_failures,
        "health_p99_ms": float(np.percentile(health, 99)) if len(health) else None,
        "health_max_ms": float(health.max()) if len(health) else None,
        "rejection_p50_ms": float(np.percentile(rejection_ms, 50)) if len(rejection_ms) else None,
        "rejection_max_ms": float(rejection_ms.max()) if len(rejection_ms) else None,
    }


def speed_probe_ms() -> float:
    """Return the median milliseconds of SPEED_PROBE_ROUNDS rounds of a fixed pure-Python loop.

    Lower is faster. Run it while nothing else on the machine is busy.
    """
    rounds = []
    for _ in range(SPEED_PROBE_ROUNDS):
        started = time.perf_counter()
        total = 0
        for value in range(SPEED_PROBE_ADDITIONS):
            total += value
        rounds.append(time.perf_counter() - started)
        time.sleep(SPEED_PROBE_PAUSE_S)
    return 1000.0 * statistics.median(rounds)


class RssSampler:
    """A thread that samples a process's resident memory and keeps the largest value."""

    def __init__(self, pid: int) -> None:
        self._path = pathlib.Path(f"/proc/{pid}/status")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.largest_kib = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(timeout=5)
        return round(self.largest_kib / 1024, 1)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for line in self._path.read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.largest_kib = max(self.largest_kib, int(line.split()[1]))
            except FileNotFoundError:
                return
            self._stop.wait(RSS_SAMPLE_INTERVAL_S)


class BusySampler:
    """A thread that reads the server's busy fraction from its /metrics page, with the seconds since start."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()
        self.samples: list[tuple[float, float]] = []

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def median_between(self, first_s: float, last_s: float) -> float | None:
        """Return the median fraction sampled from ``first_s`` to ``last_s`` seconds after start."""
        values = [value for at, value in self.samples if first_s <= at <= last_s]
        return float(np.median(values)) if values else None

    def _run(self) -> None:
        import urllib.request

        while not self._stop.is_set():
            with urllib.request.urlopen(self._url, timeout=5) as response:
                text = response.read().decode()
            match = re.search(r"(?m)^streaminfer_busy_fraction (\S+)$", text)
            if match:
                self.samples.append((time.monotonic() - self._started, float(match.group(1))))
            self._stop.wait(BUSY_SAMPLE_INTERVAL_S)


def metrics_url(server_log: list[str]) -> str:
    """Return the /metrics address the server printed when it started."""
    for line in server_log:
        match = re.search(r"streaminfer metrics on (http://\S+/metrics)", line)
        if match:
            return match.group(1)
    raise RuntimeError("the server did not print its metrics address")


def run_sweep(
    label: str, config_text: str, levels: list[int], args: argparse.Namespace, measure_busy: bool
) -> list[dict]:
    """Run every offered load against one server; with ``measure_busy``, also read its busy fraction."""
    import uvloop

    with tempfile.TemporaryDirectory() as folder:
        config_path = pathlib.Path(folder) / "server.toml"
        config_path.write_text(config_text)
        server_args = ["--config", str(config_path)]
        if args.inference_cpus:
            server_args += ["--inference-cpus", args.inference_cpus]
        server = start_server(server_args)
        rows = []
        try:
            for streams in levels:
                print(f"[{label}] offering {streams} streams ...", flush=True)
                probe_before_ms = speed_probe_ms()
                started = time.monotonic()
                cpu_before = server.cpu_seconds()
                sampler = RssSampler(server.process.pid)
                sampler.start()
                busy = BusySampler(metrics_url(server.log)) if measure_busy else None
                if busy is not None:
                    busy.start()
                row = uvloop.run(
                    offered_load(
                        f"127.0.0.1:{server.port}",
                        streams,
                        args.ramp_s,
                        args.duration_s,
                        args.warmup_s,
                        args.budget_ms / 1000.0,
                        args.chunk_ms,
                    )
                )
                row["server_rss_mib"] = sampler.stop()
                if busy is not None:
                    busy.stop()
                    # From a second after the last stream opened until the first one ends.
                    row["busy_fraction"] = busy.median_between(0.5 + args.ramp_s + 1.0, 0.5 + args.duration_s)
                row["wall_seconds"] = round(time.monotonic() - started, 1)
                row["server_cpu_percent"] = round(100 * (server.cpu_seconds() - cpu_before) / row["wall_seconds"])
                row["speed_probe_ms"] = probe_before_ms
                rows.append(row)
                p99 = "-" if row["p99_ms"] is None else f"{row['p99_ms']:.0f} ms"
                health = "-" if row["health_max_ms"] is None else f"{row['health_max_ms']:.0f} ms"
                rejection = "" if row["rejection_max_ms"] is None else (
                    f" (rejection time p50 {row['rejection_p50_ms']:.1f} ms, slowest {row['rejection_max_ms']:.1f} ms)"
                )
                print(
                    f"[{label}] {streams} offered: {row['admitted']} admitted, goodput {row['goodput']}, "
                    f"p99 {p99}, rejected {row['rejected']}{rejection}, slowest health check {health}, "
                    f"speed probe before it {row['speed_probe_ms']:.1f} ms a round (lower is faster), "
                    f"server RSS {row['server_rss_mib']} MiB"
                    + ("" if row.get("busy_fraction") is None else f", busy fraction {row['busy_fraction']:.2f}"),
                    flush=True,
                )
                time.sleep(1.0)
        finally:
            server.stop()
    return rows


def plot_svg(report: dict, path: pathlib.Path) -> None:
    """Draw goodput against offered streams for every sweep as a small SVG line chart."""
    width, height, margin = 640, 360, 56
    colors = {"on": "#1f77b4", "shed": "#2ca02c", "off": "#d62728"}
    series = {MODES[mode]: (colors[mode], rows) for mode, rows in report["sweeps"].items()}
    max_x = max(row["offered"] for _, rows in series.values() for row in rows)
    max_y = max(max((row["goodput"] for _, rows in series.values() for row in rows), default=1), 1)

    def x(value: float) -> float:
        return margin + (width - 2 * margin) * value / max_x

    def y(value: float) -> float:
        return height - margin - (height - 2 * margin) * value / max_y

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<line x1="{margin}" y1="{height - margin}" x2="{width - margin}" y2="{height - margin}" stroke="black"/>',
        f'<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{height - margin}" stroke="black"/>',
        f'<text x="{width / 2}" y="{height - 16}" text-anchor="middle">offered streams</text>',
        f'<text x="16" y="{height / 2}" transform="rotate(-90 16 {height / 2})" text-anchor="middle">'
        "streams that met the latency budget</text>",
    ]
    for fraction in (0, 0.25, 0.5, 0.75, 1.0):
        value_x, value_y = max_x * fraction, max_y * fraction
        parts.append(f'<text x="{x(value_x)}" y="{height - margin + 16}" text-anchor="middle">{value_x:.0f}</text>')
        parts.append(f'<text x="{margin - 6}" y="{y(value_y) + 4}" text-anchor="end">{value_y:.0f}</text>')
    for index, (name, (color, rows)) in enumerate(series.items()):
        points = " ".join(f"{x(row['offered']):.1f},{y(row['goodput']):.1f}" for row in rows)
        parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        for row in rows:
            parts.append(f'<circle cx="{x(row["offered"]):.1f}" cy="{y(row["goodput"]):.1f}" r="3" fill="{color}"/>')
        parts.append(f'<text x="{width - margin - 110}" y="{margin + 16 * index}" fill="{color}">{name}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def markdown(report: dict) -> str:
    cpus = report.get("inference_cpus")
    pinned = f"Every server ran with `--inference-cpus {cpus}`. " if cpus else ""
    on_fraction = report.get("on_max_busy_fraction")
    on_busy = f"`admission.max_busy_fraction = {on_fraction:g}`. " if on_fraction else "the busy-fraction check off. "
    on_busy += "A fixed cap does not follow the machine's speed. "
    lines = [
        SECTION_START,
        "## Goodput against offered load, admission control on and off",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}  ",
        f"Date: {report['date']}",
        "",
        f"Each stream sends {report['chunk_ms']} ms PCM16 chunks at 16 kHz in real time for {report['duration_s']:g} s; "
        f"streams open over {report['ramp_s']:g} s, {STREAMS_PER_CONNECTION} to a connection in the order they open. "
        "A stream meets its budget when it is admitted, every chunk is "
        f"acknowledged and 99 % of its chunks are acknowledged within {report['budget_ms']:g} ms of their scheduled "
        f"send time (the first {report['warmup_s']:g} s are not timed). Admission on: "
        f"`admission.max_streams = {report['max_streams']}`"
        f"{' (sized from an earlier run of this benchmark)' if report['max_streams'] == DEFAULT_MAX_STREAMS else ''}, "
        f"`admission.max_queue_wait_ms = {report['max_queue_wait_ms']:g}`, "
        f"{on_busy}"
        "Shedding only: no configured stream cap, "
        f"`admission.max_busy_fraction = {report['max_busy_fraction']:g}`"
        f"{' (the default)' if report['max_busy_fraction'] == AdmissionConfig().max_busy_fraction else ''}, "
        f"`admission.max_queue_wait_ms = {report['max_queue_wait_ms']:g}`. "
        "Admission off: none of them. A rejected stream is not retried. "
        f"{pinned}"
        "The load generator runs on the same 2 cores as the server, so past capacity it competes for CPU too. "
        f"A health check goes to the server every {HEALTH_PROBE_INTERVAL_S * 1000:.0f} ms on its own connection "
        "from a process of its own (`benchmarks/health_probe.py`), timed there; "
        "server RSS is the largest resident size sampled during the run. The busy fraction is the median of "
        f"`streaminfer_busy_fraction` read every {BUSY_SAMPLE_INTERVAL_S:g} s while every admitted stream was open "
        "(a server with the check off does not measure it). A rejection's time runs from the call to its status. "
        "Machine speed is measured with the server idle just before each offered load: the "
        f"fastest probe of the run over this one (1.00 is the fastest; the probe is the median of {SPEED_PROBE_ROUNDS} "
        f"rounds of {SPEED_PROBE_ADDITIONS:,} additions in pure Python).",
        "",
        "![goodput against offered streams](bench-results/goodput.svg)",
        "",
        "| admission | offered | admitted | rejected | rejection p50 / max ms | goodput | p50 ms | p99 ms "
        "| health p99 / max ms | busy fraction | server CPU % | server RSS MiB | machine speed |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    fastest_ms = fastest_probe_ms(report)
    for mode, rows in report["sweeps"].items():
        label = MODES[mode].removeprefix("admission ")
        for row in rows:
            rejected = ", ".join(f"{count} {code}" for code, count in row["rejected"].items()) or "0"
            p50 = "-" if row["p50_ms"] is None else f"{row['p50_ms']:.0f}"
            p99 = "-" if row["p99_ms"] is None else f"{row['p99_ms']:.0f}"
            health = "-" if row["health_p99_ms"] is None else f"{row['health_p99_ms']:.0f} / {row['health_max_ms']:.0f}"
            if row["health_failures"]:
                health += f" ({row['health_failures']} failed)"
            busy = "-" if row.get("busy_fraction") is None else f"{row['busy_fraction']:.2f}"
            rejection = "-" if row.get("rejection_max_ms") is None else (
                f"{row['rejection_p50_ms']:.0f} / {row['rejection_max_ms']:.0f}"
            )
            speed = f"{fastest_ms / row['speed_probe_ms']:.2f}"
            lines.append(
                f"| {label} | {row['offered']} | {row['admitted']} | {rejected} | {rejection} | {row['goodput']} | "
                f"{p50} | {p99} | {health} | {busy} | {row['server_cpu_percent']} | {row['server_rss_mib']} | {speed} |"
            )
    summary = report["summary"]
    at_top = "; ".join(
        f"{MODES[mode]} {values['goodput']} ({values['ratio_to_own_peak']:.2f} of its own peak of "
        f"{values['own_peak']}, {values['ratio']:.2f} of the overall peak)"
        for mode, values in summary["top"].items()
    )
    lines += [
        "",
        f"Peak goodput over all runs: {summary['peak_goodput']} streams. At the highest offered load "
        f"({summary['top_offered']} streams): {at_top}. {speed_range(report)}",
        SECTION_END,
    ]
    return "\n".join(lines)


def speed_probes_ms(report: dict) -> list[float]:
    """Return the speed probe of every offered load in ``report``, milliseconds."""
    return [row["speed_probe_ms"] for rows in report["sweeps"].values() for row in rows]


def fastest_probe_ms(report: dict) -> float:
    """Return the fastest speed probe of every offered load in ``report``, milliseconds."""
    return min(speed_probes_ms(report), default=1.0)


def speed_range(report: dict) -> str:
    """Return a sentence on the slowest machine speed the run's probes saw, or nothing without probes."""
    probes = speed_probes_ms(report)
    if not probes:
        return ""
    return f"The machine's speed probes ranged from {min(probes) / max(probes):.2f} to 1.00 of the fastest."


def write_markdown(path: pathlib.Path, section: str, start: str = SECTION_START, end: str = SECTION_END) -> None:
    """Replace the part of ``path`` between the ``start`` and ``end`` markers with ``section``, or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--offered",
        default="50,100,150,200,300,450,600",
        help="offered loads in concurrent streams, comma-separated (default: 50,100,150,200,300,450,600)",
    )
    parser.add_argument("--duration-s", type=float, default=8.0, help="seconds each stream sends audio (default: 8)")
    parser.add_argument("--ramp-s", type=float, default=2.0, help="seconds over which the streams open (default: 2)")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="seconds of each stream not timed (default: 1)")
    parser.add_argument("--chunk-ms", type=int, default=32, help="audio per chunk, milliseconds (default: 32)")
    parser.add_argument("--budget-ms", type=float, default=150.0, help="per-chunk latency budget, milliseconds (default: 150)")
    parser.add_argument(
        "--max-streams",
        type=int,
        default=DEFAULT_MAX_STREAMS,
        help=f"admission.max_streams of the admission-on server (default: {DEFAULT_MAX_STREAMS})",
    )
    parser.add_argument(
        "--max-queue-wait-ms",
        type=float,
        default=100.0,
        help="admission.max_queue_wait_ms of every server but admission off, milliseconds (default: 100)",
    )
    parser.add_argument(
        "--max-busy-fraction",
        type=float,
        default=AdmissionConfig().max_busy_fraction,
        help="admission.max_busy_fraction of the shedding-only server, a fraction from 0 to 1 "
        f"(default: the server's, {AdmissionConfig().max_busy_fraction:g})",
    )
    parser.add_argument(
        "--on-max-busy-fraction",
        type=float,
        default=0.0,
        help="admission.max_busy_fraction of the admission-on server beside its stream cap, a fraction from 0 to 1; "
        "0 turns the check off (default: 0)",
    )
    parser.add_argument(
        "--modes",
        default="on,shed,off",
        help="admission modes to sweep: on, shed, off (default: on,shed,off)",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print the figures only; leave BENCHMARKS.md and bench-results/ alone"
    )
    parser.add_argument(
        "--inference-cpus",
        default="",
        metavar="CPUS",
        help="pass --inference-cpus CPUS to every server, pinning its inference threads (default: no pinning)",
    )
    args = parser.parse_args()
    levels = [int(value) for value in args.offered.split(",")]

    report = {
        "command": " ".join(["python", "benchmarks/goodput.py", *sys.argv[1:]]),
        "machine": machine_description(),
        "date": datetime.date.today().isoformat(),
        "duration_s": args.duration_s,
        "ramp_s": args.ramp_s,
        "warmup_s": args.warmup_s,
        "chunk_ms": args.chunk_ms,
        "budget_ms": args.budget_ms,
        "max_streams": args.max_streams,
        "max_queue_wait_ms": args.max_queue_wait_ms,
        "max_busy_fraction": args.max_busy_fraction,
        "inference_cpus": args.inference_cpus,
        "on_max_busy_fraction": args.on_max_busy_fraction,
    }
    modes = [mode.strip() for mode in args.modes.split(",")]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        parser.error(f"--modes: unknown mode(s) {', '.join(unknown)}; expected on, shed or off")
    report["sweeps"] = {
        mode: run_sweep(
            MODES[mode],
            server_config(mode, args.max_streams, args.max_queue_wait_ms, args.max_busy_fraction, args.on_max_busy_fraction),
            levels,
            args,
            measure_busy=(mode == "shed" and args.max_busy_fraction > 0) or (mode == "on" and args.on_max_busy_fraction > 0),
        )
        for mode in modes
    }

    peak = max(row["goodput"] for rows in report["sweeps"].values() for row in rows)
    report["summary"] = {
        "peak_goodput": peak,
        "top_offered": levels[-1],
        "top": {
            mode: {
                "goodput": rows[-1]["goodput"],
                "ratio": rows[-1]["goodput"] / peak if peak else 0.0,
                "own_peak": max(row["goodput"] for row in rows),
                "ratio_to_own_peak": rows[-1]["goodput"] / max(1, max(row["goodput"] for row in rows)),
            }
            for mode, rows in report["sweeps"].items()
        },
    }
    print(json.dumps(report["summary"], indent=2))
    if args.no_write:
        return 0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "goodput.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_svg(report, RESULTS / "goodput.svg")
    write_markdown(REPO_ROOT / "BENCHMARKS.md", markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
