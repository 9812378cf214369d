"""The ``streaminfer-loadtest`` command."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing
import os
import queue
import sys
import time
from typing import Any

from streaminfer.client import tls_credentials

from streaminfer.loadtest.media import SIGNALS
from streaminfer.loadtest.runner import LoadConfig, StreamPlan, plan_streams, run_load
from streaminfer.loadtest.schedule import parse_ramp
from streaminfer.loadtest.stats import Recorder

DESCRIPTION = """\
Open real-time streams against a streaminfer server and measure per-chunk latency from each
chunk's scheduled send time to the ack that covers it, so a slow server cannot hide its tail
behind a slower client. Pick one load shape: --concurrency, --arrival-rate or --ramp. Every
run ends after --duration seconds plus at most --drain seconds."""


# The variable the API key is read from when --api-key is not given, as for streaminfer-client.
API_KEY_ENVIRONMENT_VARIABLE = "STREAMINFER_API_KEY"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Add the default to each option's help, except where the help states the default itself."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streaminfer-loadtest", description=DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051", help="server address HOST:PORT")
    parser.add_argument("--scenario", choices=("audio", "video", "text", "mix"), default="audio",
                   help="what each stream sends: real-time audio, video frames at --fps, text sentences at --wpm, "
                   "or a mix of stream kinds weighted by --mix")
    parser.add_argument("--mix", default="8:1:1", metavar="A:V:T",
                   help="with --scenario mix: relative numbers of audio, video and text streams")
    parser.add_argument("--duration", type=float, default=30.0, metavar="SECONDS",
                   help="seconds of sending; no chunk is scheduled later")
    parser.add_argument("--drain", type=float, default=10.0, metavar="SECONDS",
                   help="seconds a stream may wait for its last responses after its last chunk; "
                   "chunks still unanswered then count as UNANSWERED")
    parser.add_argument("--stream-seconds", type=float, default=None, metavar="SECONDS",
                   help="length of each stream; a fixed-concurrency slot opens a new stream when one ends "
                   "(default: the whole --duration for --concurrency, 10 s for --arrival-rate)")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--concurrency", type=int, default=None, metavar="N",
                       help="N streams open at once for the whole run (default 4 when no shape is given)")
    shape.add_argument("--arrival-rate", type=float, default=None, metavar="STREAMS_PER_S",
                       help="open loop: new streams arrive as a Poisson process at this mean rate, planned "
                       "in advance from --seed; each is timed from its scheduled start")
    shape.add_argument("--ramp", default=None, metavar="START:STEP:EVERY_S:MAX",
                       help="start with START streams, add STEP every EVERY_S seconds up to MAX, stop at the first "
                       "step whose p99 goes over --budget-ms (over 1 %% of its chunks late) and report the last concurrency that passed (one process only)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the --arrival-rate schedule")
    parser.add_argument("--max-streams", type=int, default=10_000, metavar="N", help="at most this many streams in a run")
    parser.add_argument("--budget-ms", type=float, default=100.0, metavar="MS",
                   help="per-chunk latency budget in milliseconds, for goodput and --ramp")
    parser.add_argument("--warmup", type=float, default=0.0, metavar="S",
                        help="seconds at the start of each stream whose chunks count in the latency figures but not "
                        "in goodput, which judges the later chunks against --budget-ms (default: 0, every chunk)")

    audio = parser.add_argument_group("audio")
    audio.add_argument("--chunk-ms", type=float, default=32.0, metavar="MS", help="audio chunk length in milliseconds; one chunk is sent per chunk length")
    audio.add_argument("--sample-rate", type=int, default=16_000, metavar="HZ", help="audio sample rate in hertz, of 16-bit mono PCM")
    audio.add_argument("--signal", choices=SIGNALS, default=None,
                       help="send a generated signal instead of media/audio/speech_sample.wav (default: the WAV file)")
    audio.add_argument("--audio-model", default="silero_vad", help="model of audio streams")

    video = parser.add_argument_group("video")
    video.add_argument("--fps", type=float, default=2.0, metavar="FRAMES_PER_S",
                       help="frames per second of each video stream; frames come from media/video/vtest.avi when OpenCV "
                       "is installed, else a generated JPEG image")
    video.add_argument("--video-model", default="hog_people", help="model of video streams")

    text = parser.add_argument_group("text")
    text.add_argument("--wpm", type=float, default=150.0, metavar="WORDS_PER_MIN",
                      help="text pace in words per minute; each chunk is one whole sentence of media/text/gpl3_preamble.txt")
    text.add_argument("--text-model", default="minilm_embedding", help="model of text streams")

    run = parser.add_argument_group("client")
    run.add_argument("--media-dir", default="media", metavar="DIR", help="folder holding audio/, video/ and text/ samples")
    run.add_argument("--connections", type=int, default=4, metavar="N", help="gRPC channels (HTTP/2 connections) per process; streams take them in turn")
    run.add_argument("--processes", type=int, default=1, metavar="N", help="worker processes; streams are split among them and their histograms merged")
    run.add_argument("--retries", type=int, default=0, metavar="N", help="retries of a rejected stream setup; with 0 a rejection counts as a failed stream")

    connect = parser.add_argument_group("connection")
    connect.add_argument("--api-key", default=None, metavar="KEY",
                         help=f"API key, sent in the x-api-key metadata of every stream, for a server with [auth] keys "
                         f"(default: the {API_KEY_ENVIRONMENT_VARIABLE} environment variable, which keeps the key out "
                         "of the process list; none when unset)")
    connect.add_argument("--tls", action="store_true",
                         help="connect with TLS, trusting gRPC's default root certificates unless --ca-file is given "
                         "(default: plaintext)")
    connect.add_argument("--ca-file", default=None, metavar="PEM",
                         help="PEM file of the CA certificates that signed the server's certificate; implies --tls")
    connect.add_argument("--cert-file", default=None, metavar="PEM",
                         help="PEM file of the client certificate chain, for a server that requires client "
                         "certificates; needs --key-file, implies --tls")
    connect.add_argument("--key-file", default=None, metavar="PEM",
                         help="PEM file of the private key of --cert-file; needs --cert-file, implies --tls")

    out = parser.add_argument_group("output")
    out.add_argument("--json", default=None, metavar="FILE", help="write the full report, histograms included, as JSON (default: none)")
    out.add_argument("--plot", default=None, metavar="FILE.png", help="write latency over time (and, for --ramp, latency against load) as PNG (default: none)")
    out.add_argument("--metrics-url", default=None, metavar="URL",
                     help="the server's Prometheus page, for example http://127.0.0.1:9464/metrics, read before and after "
                     "the run for the server-side breakdown (default: not read)")
    out.add_argument("--quiet", action="store_true",
                     help="no progress line on stderr (default: one rewritten about every second on a terminal, "
                     "a new one every 5 s otherwise)")
    return parser


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    def positive(name: str, value: float | None) -> None:
        if value is not None and not value > 0:
            raise ValueError(f"--{name} {value!r} is invalid: expected a value > 0")

    for name in ("duration", "stream_seconds", "arrival_rate", "budget_ms", "chunk_ms", "fps", "wpm"):
        positive(name.replace("_", "-"), getattr(args, name))
    if args.drain < 0:
        raise ValueError(f"--drain {args.drain!r} is invalid: expected seconds >= 0")
    if not args.warmup >= 0:
        raise ValueError(f"--warmup {args.warmup!r} is invalid: expected seconds >= 0")
    for name in ("concurrency", "processes", "connections", "sample_rate", "max_streams"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value!r} is invalid: expected a whole number >= 1")
    try:
        mix = tuple(int(part) for part in args.mix.split(":"))
    except ValueError:
        mix = ()
    if len(mix) != 3:
        raise ValueError(f"--mix {args.mix!r} is invalid: expected A:V:T, for example 8:1:1")
    ramp = parse_ramp(args.ramp) if args.ramp else None
    if ramp is not None and args.processes > 1:
        raise ValueError("--ramp runs in one process: drop --processes")
    concurrency = args.concurrency
    if concurrency is None and args.arrival_rate is None and ramp is None:
        concurrency = 4
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENVIRONMENT_VARIABLE)
    api_key = api_key or None
    if api_key is not None and api_key != api_key.strip():
        raise ValueError(
            f"--api-key (or {API_KEY_ENVIRONMENT_VARIABLE}) is invalid: expected a key without leading or "
            "trailing whitespace"
        )
    if (args.cert_file is None) != (args.key_file is None):
        raise ValueError("--cert-file and --key-file go together: give both for a client certificate, or neither")
    if args.ca_file is not None or args.cert_file is not None:
        try:
            # Read once here, so that a bad file stops the run before any stream. Each process reads them again.
            tls_credentials(args.ca_file, args.cert_file, args.key_file)
        except ValueError as error:
            message = str(error)
            for name in ("ca_file", "cert_file", "key_file"):
                message = message.replace(name, "--" + name.replace("_", "-"), 1)
            raise ValueError(message) from error
    return LoadConfig(
        target=args.target, scenario=args.scenario, mix=mix, duration_s=args.duration, stream_s=args.stream_seconds,
        concurrency=concurrency, arrival_rate=args.arrival_rate, ramp=ramp, seed=args.seed, max_streams=args.max_streams,
        budget_ms=args.budget_ms, warmup_s=args.warmup, drain_s=args.drain, chunk_ms=args.chunk_ms, sample_rate=args.sample_rate,
        signal=args.signal, media_dir=args.media_dir, fps=args.fps, wpm=args.wpm, audio_model=args.audio_model,
        video_model=args.video_model, text_model=args.text_model, connections=args.connections, retries=args.retries,
        progress=not args.quiet, api_key=api_key, tls=args.tls or args.ca_file is not None or args.cert_file is not None, ca_file=args.ca_file,
        cert_file=args.cert_file, key_file=args.key_file,
    )


def connection_hint(status_messages: dict[str, str], config: LoadConfig) -> str:
    """Return the option that likely fixes the failed streams, from the first message per status, or ''."""
    if "UNAUTHENTICATED" in status_messages:
        if config.api_key is None:
            return f"pass the key with --api-key or the {API_KEY_ENVIRONMENT_VARIABLE} environment variable"
        return f"check the API key from --api-key or {API_KEY_ENVIRONMENT_VARIABLE}: the server does not accept it"
    unavailable = status_messages.get("UNAVAILABLE", "")
    if "CERTIFICATE_VERIFY_FAILED" in unavailable:
        return "the server's certificate is not trusted: pass its CA with --ca-file"
    if "Socket closed" in unavailable and not config.tls:
        return "if the server uses TLS, add --tls (and --ca-file for a private CA)"
    return ""


def offered_load(config: LoadConfig) -> dict[str, Any]:
    if config.ramp is not None:
        r = config.ramp
        return {"shape": "ramp", "description": f"ramp {r.start}+{r.step} streams every {r.every_s:g} s up to {r.maximum}"}
    if config.arrival_rate is not None:
        return {"shape": "open_loop", "streams_per_s": config.arrival_rate,
                "description": f"{config.arrival_rate:g} new {config.scenario} streams/s (Poisson, seed {config.seed})"}
    return {"shape": "concurrency", "streams": config.concurrency,
            "description": f"{config.concurrency} concurrent {config.scenario} streams"}


class ProgressLine:
    """One line on stderr, rewritten in place; on a non-terminal, a new line every 5 s."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.line_drawn = False
        self.last_plain = 0.0

    def show(self, snapshot: dict[str, Any]) -> None:
        if not self.enabled:
            return
        p99 = snapshot.get("p99_ms")
        text = (f"{snapshot['elapsed_s']:6.1f} s  streams open {snapshot['open_streams']:5d}  "
                f"chunks/s {snapshot['chunks_per_s']:8.1f}  p99 {'-' if p99 is None else f'{p99:.1f} ms'}  "
                f"errors {snapshot['errors']}")
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + text)
            self.line_drawn = True
        elif time.monotonic() - self.last_plain >= 5.0:
            sys.stderr.write(text + "\n")
            self.last_plain = time.monotonic()
        sys.stderr.flush()

    def done(self) -> None:
        if self.line_drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _worker(config: LoadConfig, plans: list[StreamPlan], t0_wall: float, worker: int, results: Any, updates: Any) -> None:
    """Run one worker process's plans and send its histograms back to the parent."""
    def progress(snapshot: dict[str, Any]) -> None:
        try:
            updates.put_nowait((worker, snapshot))
        except queue.Full:
            pass

    try:
        recorder, _ = asyncio.run(run_load(config, plans, t0_wall, progress if config.progress else None))
        results.put((worker, recorder.to_wire(), None))
    except BaseException as error:  # reported by the parent
        results.put((worker, None, f"{type(error).__name__}: {error}"))


def run_processes(config: LoadConfig, processes: int, progress: ProgressLine) -> Recorder:
    """Split the planned streams over ``processes`` workers and merge what they measured."""
    plans = plan_streams(config)
    shares: list[list[StreamPlan]] = [plans[i::processes] for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    updates = context.Queue(maxsize=1000)
    # Workers need a few seconds to start. They share one start time, so the plan is the same in every process.
    t0_wall = time.time() + 3.0
    workers = [context.Process(target=_worker, args=(config, share, t0_wall, i, results, updates), daemon=True)
               for i, share in enumerate(shares)]
    for process in workers:
        process.start()

    merged = Recorder(budget_ms=config.budget_ms)
    latest: dict[int, dict[str, Any]] = {}
    received = 0
    errors: list[str] = []
    deadline = time.monotonic() + 3.0 + config.duration_s + config.drain_s + 60.0
    while received < processes and time.monotonic() < deadline:
        try:
            worker, wire, error = results.get(timeout=0.2)
        except queue.Empty:
            pass
        else:
            received += 1
            if error is not None:
                errors.append(f"worker {worker}: {error}")
            else:
                merged.merge(Recorder.from_wire(wire))
        while True:
            try:
                worker, snapshot = updates.get_nowait()
            except queue.Empty:
                break
            latest[worker] = snapshot
            if len(latest) == processes or worker == 0:
                progress.show({
                    "elapsed_s": max(s["elapsed_s"] for s in latest.values()),
                    "open_streams": sum(s["open_streams"] for s in latest.values()),
                    "chunks_per_s": sum(s["chunks_per_s"] for s in latest.values()),
                    # Across processes the line shows the largest p99; the summary merges the histograms.
                    "p99_ms": max((s["p99_ms"] for s in latest.values() if s["p99_ms"] is not None), default=None),
                    "errors": sum(s["errors"] for s in latest.values()),
                })

    for process in workers:
        process.join(timeout=10)
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
    if received < processes:
        errors.append(f"{processes - received} worker(s) sent no result in time")
    if errors:
        raise RuntimeError("; ".join(errors))
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    from streaminfer.loadtest import report as reporting
    from streaminfer.loadtest import server_metrics

    before = None
    if args.metrics_url:
        try:
            before = server_metrics.fetch(args.metrics_url)
        except OSError as error:
            print(f"streaminfer-loadtest: cannot read {args.metrics_url}: {error}", file=sys.stderr)
            return 2
    progress = ProgressLine(config.progress)
    started = time.monotonic()
    ramp_result = None
    try:
        if args.processes > 1:
            recorder = run_processes(config, args.processes, progress)
        else:
            recorder, ramp_result = asyncio.run(run_load(config, progress=progress.show if config.progress else None))
    except KeyboardInterrupt:
        progress.done()
        return 130
    except (OSError, ValueError, RuntimeError) as error:
        progress.done()
        print(f"streaminfer-loadtest: {error}", file=sys.stderr)
        return 1
    progress.done()
    wall = time.monotonic() - started
    server = None
    if before is not None:
        try:
            server = {"url": args.metrics_url, "models": server_metrics.server_breakdown(before, server_metrics.fetch(args.metrics_url))}
        except OSError as error:
            server = {"url": args.metrics_url, "error": f"cannot read the page after the run: {error}", "models": {}}
    # The report names whether a key was sent, never the key.
    hidden = ("ramp", "api_key")
    settings = {key: value for key, value in dataclasses.asdict(config).items() if key not in hidden}
    settings["api_key_sent"] = config.api_key is not None
    settings["ramp"] = args.ramp
    settings["processes"] = args.processes
    report = reporting.build_report(recorder, settings, wall, offered_load(config), ramp_result, server)
    print(reporting.format_summary(report))
    hint = connection_hint(report.get("status_messages", {}), config)
    if hint:
        print(f"streaminfer-loadtest: hint: {hint}", file=sys.stderr)
    if args.json:
        reporting.write_json(args.json, report)
    if args.plot:
        reporting.write_plot(args.plot, report)
    c = report["counts"]
    # 0 when every chunk got an ack and every stream opened, 3 when some chunks or streams failed.
    return 0 if c["chunk_errors"] == c["chunks_unanswered"] == c["streams_failed"] == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
