"""Benchmark: streaminfer against Ray Serve with @serve.batch, on real-time VAD streams.

Both sides serve Silero VAD batched across streams with the same batching
parameters as streaminfer's built-in silero_vad model (at most 256 items, at
most 4 ms of queue delay) and the same torch threads (cores minus one). Each
level runs N streams of 16 kHz speech in 32 ms chunks (one 512-sample window
each) for a while. Per chunk it records the latency from the scheduled send
time to the response covering it, so a slow server cannot hide its tail
behind late sends.

- streaminfer: the built-in server, one bidirectional Stream call per stream
  (benchmarks/vad_streams.py's real-time load).
- Ray Serve: one deployment replica whose ``Detect`` method is wrapped in
  ``@serve.batch`` and keeps each stream's VAD state by stream id, behind
  Serve's gRPC ingress. That ingress has no bidirectional streams, so the
  client makes one unary call per chunk (benchmarks/peer/vad_peer.proto),
  with the same pacing and measurement.

Ray's gRPC proxy listens on every interface, and Ray tries to reach public
addresses (8.8.8.8 and 2001:4860:4860::8888, port 53) to find its own IP
address. So by default the benchmark runs itself again in a new network
namespace (``unshare --net``, which needs root) whose only interface is
loopback. ``--no-netns`` runs it in place.

Ray is an optional extra that CI does not install: ``make bench-peer``
installs it (``pip install -e '.[peer]'``) and runs this file. Results go to
stdout, bench-results/peer.json, bench-results/peer.png and the peer section
of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

BENCHMARKS = pathlib.Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
PROTO_DIR = BENCHMARKS / "peer"
WINDOW = 512
CONTEXT = 64
# streaminfer's built-in silero_vad batching, which the peer copies.
MAX_BATCH_SIZE = 256
MAX_QUEUE_DELAY_S = 0.004
APPLICATION = "vad_peer"
SECTION_START = "<!-- peer:start -->"
SECTION_END = "<!-- peer:end -->"
NETNS_VARIABLE = "STREAMINFER_BENCH_IN_NETNS"


def compile_proto(out_dir: pathlib.Path) -> None:
    """Generate vad_peer_pb2 and vad_peer_pb2_grpc into ``out_dir``."""
    from grpc_tools import protoc

    code = protoc.main(
        ["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", "vad_peer.proto"]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed on {PROTO_DIR / 'vad_peer.proto'} with exit code {code}")


class PeerVad:
    """Silero VAD over a batch of one-window requests from many streams, each stream's state kept here.

    Requests of one stream in the same batch run in order: the n-th of them
    goes in the n-th forward pass.
    """

    def __init__(self, torch_threads: int) -> None:
        import torch
        from silero_vad import load_silero_vad

        torch.set_num_threads(torch_threads)
        self._torch = torch
        self._model = load_silero_vad()._model
        self._model.eval()
        # Stream id -> (LSTM state (2, 128), the 64 samples before its next window).
        self._states: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def streams(self) -> int:
        return len(self._states)

    def detect(self, requests: Sequence[Any], response_type: Any) -> list[Any]:
        for request in requests:
            if len(request.audio_content) != 2 * WINDOW:
                raise ValueError(
                    f"audio_content has {len(request.audio_content)} bytes; send one window, {2 * WINDOW} bytes of LINEAR16"
                )
        passes: list[list[int]] = []
        seen: collections.Counter[str] = collections.Counter()
        for index, request in enumerate(requests):
            position = seen[request.stream_id]
            seen[request.stream_id] += 1
            if position == len(passes):
                passes.append([])
            passes[position].append(index)

        probabilities = [0.0] * len(requests)
        for indexes in passes:
            for index, value in zip(indexes, self._forward([requests[index] for index in indexes])):
                probabilities[index] = value
        return [
            response_type(sequence_number=request.sequence_number, speech_probability=probability)
            for request, probability in zip(requests, probabilities)
        ]

    def _forward(self, requests: Sequence[Any]) -> list[float]:
        empty = (np.zeros((2, 128), np.float32), np.zeros(CONTEXT, np.float32))
        states = [self._states.get(request.stream_id, empty) for request in requests]
        samples = [np.frombuffer(request.audio_content, dtype="<i2").astype(np.float32) / 32768.0 for request in requests]
        x = np.stack([np.concatenate((context, window)) for (_, context), window in zip(states, samples)])
        lstm = np.stack([state for state, _ in states], axis=1)
        with self._torch.inference_mode():
            output, new_state = self._model(self._torch.from_numpy(x), self._torch.from_numpy(lstm))
        new_state = new_state.numpy()
        for row, (request, window) in enumerate(zip(requests, samples)):
            self._states[request.stream_id] = (new_state[:, row].copy(), window[WINDOW - CONTEXT :].copy())
        return output[:, 0].tolist()


def make_deployment(torch_threads: int) -> Any:
    """Return the Ray Serve deployment: one replica, ``Detect`` batched with @serve.batch."""
    from ray import serve

    # Access logs off, as a team tuning for throughput would: Serve logs every request by default.
    @serve.deployment(
        num_replicas=1,
        max_ongoing_requests=4096,
        ray_actor_options={"num_cpus": 0},
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    )
    class VadPeerDeployment:
        def __init__(self) -> None:
            import vad_peer_pb2

            self._response = vad_peer_pb2.DetectResponse
            self._vad = PeerVad(torch_threads)

        @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=MAX_QUEUE_DELAY_S)
        async def Detect(self, requests: list[Any]) -> list[Any]:
            return self._vad.detect(requests, self._response)

    return VadPeerDeployment


class RayServe:
    """A local Ray cluster with the peer deployment behind Serve's gRPC ingress on 127.0.0.1."""

    def __init__(self, proto_dir: pathlib.Path, torch_threads: int) -> None:
        # Ray's processes import the generated stubs and this module.
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(proto_dir), str(BENCHMARKS), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        sys.path[:0] = [str(proto_dir)]
        import ray
        from ray import serve

        from streaminfer.server.workers import pick_free_port

        self._ray = ray
        self._serve = serve
        self.port = pick_free_port("127.0.0.1")
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            logging_level="WARNING",
        )
        serve.start(
            logging_config={"log_level": "WARNING", "enable_access_log": False},
            http_options={"host": "127.0.0.1", "port": pick_free_port("127.0.0.1")},
            grpc_options={
                "port": self.port,
                "grpc_servicer_functions": ["vad_peer_pb2_grpc.add_VadPeerServiceServicer_to_server"],
            },
        )
        serve.run(make_deployment(torch_threads).bind(), name=APPLICATION, route_prefix=f"/{APPLICATION}")

    def close(self) -> None:
        self._serve.shutdown()
        self._ray.shutdown()


async def unary_realtime_load(target: str, streams: int, chunk_ms: int, warmup_s: float, measure_s: float) -> dict:
    """Run ``streams`` real-time streams as one unary Detect call per chunk; return latency figures.

    The pacing and the measurement are those of vad_streams.realtime_load:
    chunk n of a stream is sent at its scheduled time whether or not earlier
    chunks got their response, and its latency runs from that time to its response.
    """
    import grpc
    import vad_peer_pb2
    import vad_peer_pb2_grpc

    from vad_streams import VAD_RATE, load_speech_16k, paced_chunks

    speech = load_speech_16k()
    chunk_samples = VAD_RATE * chunk_ms // 1000
    interval = chunk_ms / 1000.0
    total_chunks = int((warmup_s + measure_s) / interval)
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    metadata = (("application", APPLICATION),)
    loop = asyncio.get_running_loop()

    async def one_chunk(stub, request, when: float, measure_from: float) -> None:
        try:
            await stub.Detect(request, metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as error:
            if not errors:
                # The client's deadline is 30 s, so other codes come from Serve's proxy.
                print(f"    first error from the server: {error.code().name}: {error.details()}", flush=True)
            errors[error.code().name] += 1
            return
        if when >= measure_from:
            latencies.append(loop.time() - when)

    async def one_stream(index: int, stub, start_at: float, run_id: str) -> None:
        first = start_at + (index / streams) * interval
        calls = []
        async for seq, when, content in paced_chunks(speech, index, first, interval, total_chunks, chunk_samples):
            request = vad_peer_pb2.DetectRequest(stream_id=f"{run_id}-{index}", sequence_number=seq, audio_content=content)
            calls.append(asyncio.create_task(one_chunk(stub, request, when, start_at + warmup_s)))
        await asyncio.gather(*calls)

    channels = [grpc.aio.insecure_channel(target) for _ in range(max(1, streams // 10))]
    stubs = [vad_peer_pb2_grpc.VadPeerServiceStub(channel) for channel in channels]
    run_id = f"run{time.monotonic_ns()}"
    start_at = loop.time() + 1.0
    await asyncio.gather(*(one_stream(i, stubs[i % len(stubs)], start_at, run_id) for i in range(streams)))
    for channel in channels:
        await channel.close()
    return _figures(streams, latencies, sum(errors.values()), dict(errors))


def _figures(streams: int, latencies: list[float], errors: int, codes: dict[str, int]) -> dict:
    values = np.array(latencies) * 1000.0
    return {
        "streams": streams,
        "chunks_measured": int(len(values)),
        "p50_ms": float(np.percentile(values, 50)) if len(values) else None,
        "p99_ms": float(np.percentile(values, 99)) if len(values) else None,
        "errors": errors,
        "error_codes": codes,
    }


def run_levels(name: str, levels: list[int], budget_ms: float, load) -> list[dict]:
    """Run each level in turn until one misses the budget; return one row per level run."""
    import uvloop

    rows = []
    for streams in levels:
        busy_before = _machine_busy_seconds()
        level_started = time.monotonic()
        row = uvloop.run(load(streams))
        row["machine_cpu_percent"] = 100 * (_machine_busy_seconds() - busy_before) / (time.monotonic() - level_started)
        row["passed"] = row["p99_ms"] is not None and row["p99_ms"] < budget_ms and row["errors"] == 0
        rows.append(row)
        p99 = "-" if row["p99_ms"] is None else f"{row['p99_ms']:.1f} ms"
        codes = ", ".join(f"{code} {count}" for code, count in row["error_codes"].items())
        codes = f" ({codes})" if codes else ""
        verdict = "ok" if row["passed"] else "over"
        print(f"  {name}: {streams} streams, p99 {p99}, {row['errors']} errors{codes}: {verdict}", flush=True)
        if not row["passed"]:
            break
    return rows


def _machine_busy_seconds() -> float:
    """Return the CPU seconds all cores spent busy since boot, from /proc/stat."""
    fields = [int(value) for value in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def idle_cpu_percent(seconds: float = 5.0) -> float:
    """Return the machine's busy share of one core over ``seconds`` with no load sent."""
    before = _machine_busy_seconds()
    time.sleep(seconds)
    return 100 * (_machine_busy_seconds() - before) / seconds


def held(rows: list[dict]) -> int:
    passing = [row["streams"] for row in rows if row["passed"]]
    return max(passing) if passing else 0


def write_plot(path: pathlib.Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for key, label in (("streaminfer", "streaminfer (bidirectional Stream)"), ("ray_serve", "Ray Serve @serve.batch (unary)")):
        rows = [row for row in report[key]["levels"] if row["p99_ms"] is not None]
        axes.plot([row["streams"] for row in rows], [row["p99_ms"] for row in rows], marker="o", label=label)
    axes.axhline(report["budget_ms"], color="grey", linestyle="--", label=f"budget {report['budget_ms']:.0f} ms")
    axes.set_xlabel("concurrent real-time streams (16 kHz, 32 ms chunks)")
    axes.set_ylabel("p99 chunk latency (ms)")
    axes.set_yscale("log")
    axes.set_title("Silero VAD, batched: streaminfer against Ray Serve")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(report: dict, plot: pathlib.Path, markdown_path: pathlib.Path) -> str:
    ours, ray = report["streaminfer"], report["ray_serve"]
    by_streams = [{row["streams"]: row for row in side["levels"]} for side in (ours, ray)]
    place = "in a network namespace with loopback only" if report["network_namespace"] else "in the machine's own network namespace"
    threads = f"{report['torch_threads']} torch thread{'s' if report['torch_threads'] != 1 else ''}"
    lines = [
        SECTION_START,
        "## Peer: Ray Serve with @serve.batch",
        "",
        f"Measured {report['date']} on {report['machine']}, by `{report['command']}` in "
        f"{report['elapsed_s']:.0f} s, {place}.",
        "",
        f"Silero VAD batched across streams on both sides: at most {MAX_BATCH_SIZE} items and "
        f"{MAX_QUEUE_DELAY_S * 1000:.0f} ms of queue delay, {threads}. Each level runs real-time 16 kHz streams in "
        f"32 ms chunks for {report['warmup_s']:.0f} s unmeasured and {report['measure_s']:.0f} s measured; latency runs "
        "from a chunk's scheduled send time to the response covering it. streaminfer (one server process) gets one "
        f"bidirectional Stream per stream. Ray Serve {report['ray_version']} gets one unary call per chunk through its "
        "gRPC ingress, which has no bidirectional streams, to one replica that keeps each stream's VAD state "
        "(streaminfer also runs one model instance; `max_ongoing_requests` 4,096, so Serve queues rather than rejects). "
        f"A level passes with p99 under {report['budget_ms']:.0f} ms and no errors; each side stops at its first "
        "failing level.",
        "",
        "Machine CPU is the busy share of all cores during the level, load generator included (100 % = one core). "
        f"With no load sent, the machine was {ours['idle_cpu_percent']:.0f} % busy beside the streaminfer server and "
        f"{ray['idle_cpu_percent']:.0f} % beside Ray and Serve's processes.",
        "",
        "| streams | streaminfer p50 / p99 (ms) | machine CPU | Ray Serve p50 / p99 (ms) | machine CPU |",
        "|---:|---:|---:|---:|---:|",
    ]
    for streams in sorted(by_streams[0].keys() | by_streams[1].keys()):
        cells = []
        for rows in by_streams:
            row = rows.get(streams)
            cells.append(f"{_cell(row)} | {row['machine_cpu_percent']:.0f} %" if row else "not run | -")
        lines.append(f"| {streams} | {cells[0]} | {cells[1]} |")
    if report["conclusive"]:
        verdict = "met" if report["more_streams"] and report["lower_p99_at_every_level"] else "missed"
    else:
        verdict = "not decided: streaminfer passed the last level, so the ramp ended before it broke"
    lines += [
        "",
        f"Held within budget: streaminfer {_held_text(ours)}, Ray Serve {_held_text(ray)}. Lower p99 at every level "
        f"both ran: {'yes' if report['lower_p99_at_every_level'] else 'no'}. streaminfer's aim against this peer, more "
        f"streams within budget and lower p99 at every level: {verdict}.",
        "",
        f"![p99 against streams]({os.path.relpath(plot, markdown_path.parent)})",
        SECTION_END,
    ]
    return "\n".join(lines)


def _held_text(side: dict) -> str:
    levels = side["levels"]
    if levels and levels[-1]["passed"]:
        return f"at least {side['held_streams']} streams (passed every level run)"
    return f"{side['held_streams']} streams"


def _cell(row: dict) -> str:
    over = "" if row["passed"] else " (over)"
    if row["p99_ms"] is None:
        return f"no answer ({row['errors']} errors){over}"
    codes = ", ".join(f"{count} {code}" for code, count in row["error_codes"].items())
    errors = f", {codes or row['errors']} errors" if row["errors"] else ""
    return f"{row['p50_ms']:.1f} / {row['p99_ms']:.1f}{errors}{over}"


def reexec_in_netns() -> int:
    """Run this benchmark again in a new network namespace whose only interface is loopback; return its exit code."""
    if os.geteuid() != 0:
        print(
            "ray_peer: a new network namespace needs root; run as root, or pass --no-netns "
            "(then Ray's gRPC proxy listens on every interface and Ray tries public addresses to find its own IP address)",
            file=sys.stderr,
        )
        return 2
    script = 'ip link set lo up && exec "$0" "$@"'
    command = ["unshare", "--net", "sh", "-c", script, sys.executable, str(pathlib.Path(__file__).resolve()), *sys.argv[1:]]
    try:
        return subprocess.run(command, env={**os.environ, NETNS_VARIABLE: "1"}).returncode
    except FileNotFoundError:
        print("ray_peer: unshare is not installed; install util-linux or pass --no-netns", file=sys.stderr)
        return 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--levels",
        default="5,10,20,40,80,120,160,200,240,280",
        help="concurrent streams of each level, comma-separated (default: 5,10,20,40,80,120,160,200,240,280)",
    )
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds at the start of each level (default: 3)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds of each level (default: 8)")
    parser.add_argument("--budget-ms", type=float, default=100.0, help="p99 chunk latency budget, ms (default: 100)")
    # NOTE: the --no-netns path, and the root check before unshare, have not been run.
    parser.add_argument(
        "--no-netns",
        action="store_true",
        help="run in this network namespace: Ray's gRPC proxy then listens on every interface of the machine, "
        "and Ray tries public addresses to find its own IP address",
    )
    parser.add_argument(
        "--json", type=pathlib.Path, default=REPO_ROOT / "bench-results" / "peer.json",
        help="figures as JSON (default: bench-results/peer.json)",
    )
    parser.add_argument(
        "--plot", type=pathlib.Path, default=REPO_ROOT / "bench-results" / "peer.png",
        help="p99 against streams as PNG (default: bench-results/peer.png)",
    )
    parser.add_argument(
        "--markdown", type=pathlib.Path, default=REPO_ROOT / "BENCHMARKS.md",
        help="file whose peer section (between the peer:start and peer:end markers) is replaced (default: BENCHMARKS.md)",
    )  # fmt: skip
    options = parser.parse_args()
    if not options.no_netns and os.environ.get(NETNS_VARIABLE) != "1":
        return reexec_in_netns()

    try:
        import ray
    except ImportError:
        print("ray_peer: Ray is not installed; run `make bench-peer`, which installs it", file=sys.stderr)
        return 2

    import vad_streams

    levels = [int(level) for level in options.levels.split(",")]
    started = time.monotonic()
    threads = max(1, (os.cpu_count() or 1) - 1)

    level_s = 1 + options.warmup + options.seconds
    print(
        f"levels {', '.join(map(str, levels))} streams, about {level_s:.0f} s each, for streaminfer and then Ray "
        "Serve; each side stops at its first level over the budget",
        flush=True,
    )
    print("streaminfer ...", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        config = pathlib.Path(folder) / "server.toml"
        config.write_text(vad_streams.config_without_admission())
        server = vad_streams.start_server(["--config", str(config)])
        try:
            our_idle = idle_cpu_percent()
            ours = run_levels(
                "streaminfer",
                levels,
                options.budget_ms,
                lambda streams: _bidi_level(f"127.0.0.1:{server.port}", streams, options),
            )
        finally:
            server.stop()

        print(
            "Ray Serve ... (Ray's own log lines follow: its warning about finding the local IP address and, at the end, "
            "about ServeController.graceful_shutdown are expected here)",
            flush=True,
        )
        proto_dir = pathlib.Path(folder) / "proto"
        proto_dir.mkdir()
        compile_proto(proto_dir)
        peer = RayServe(proto_dir, threads)
        try:
            ray_idle = idle_cpu_percent()
            ray_rows = run_levels(
                "Ray Serve",
                levels,
                options.budget_ms,
                lambda streams: unary_realtime_load(f"127.0.0.1:{peer.port}", streams, 32, options.warmup, options.seconds),
            )
        finally:
            peer.close()

    both = [(row, other) for row in ours for other in ray_rows if other["streams"] == row["streams"]]
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": vad_streams.machine_description(),
        "command": " ".join(["ray_peer.py", *sys.argv[1:]]),
        "network_namespace": os.environ.get(NETNS_VARIABLE) == "1",
        "torch_threads": threads,
        "conclusive": bool(ours) and not ours[-1]["passed"],
        "ray_version": ray.__version__,
        "budget_ms": options.budget_ms,
        "warmup_s": options.warmup,
        "measure_s": options.seconds,
        "levels": levels,
        "streaminfer": {"levels": ours, "held_streams": held(ours), "idle_cpu_percent": our_idle},
        "ray_serve": {"levels": ray_rows, "held_streams": held(ray_rows), "idle_cpu_percent": ray_idle},
        "more_streams": held(ours) > held(ray_rows),
        "lower_p99_at_every_level": all(
            row["p99_ms"] is not None and (other["p99_ms"] is None or row["p99_ms"] < other["p99_ms"]) for row, other in both
        ),
        "elapsed_s": time.monotonic() - started,
    }
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(report, indent=2) + "\n")
    write_plot(options.plot, report)
    from goodput import write_markdown

    write_markdown(options.markdown, markdown(report, options.plot, options.markdown), SECTION_START, SECTION_END)
    print(
        f"held: streaminfer {report['streaminfer']['held_streams']}, Ray Serve {report['ray_serve']['held_streams']}; "
        f"wrote {options.json}, {options.plot} and {options.markdown}",
        flush=True,
    )
    return 0


async def _bidi_level(target: str, streams: int, options: argparse.Namespace) -> dict:
    import vad_streams

    result = await vad_streams.realtime_load(target, streams, 32, options.warmup, options.seconds)
    codes = {"chunk error": result["chunk_errors"], "unanswered": result["chunks_unanswered"]}
    return {
        "streams": streams,
        "chunks_measured": result["chunks_measured"],
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "errors": sum(codes.values()),
        "error_codes": {code: count for code, count in codes.items() if count},
    }


if __name__ == "__main__":
    sys.exit(main())
