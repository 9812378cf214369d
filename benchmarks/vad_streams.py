"""Benchmark: concurrent real-time VAD streams against a local streaminfer server.

Runs, in one invocation and on this machine:

1. Real time: N streams, each sending one 16 kHz PCM16 chunk every
   ``--chunk-ms`` milliseconds of real speech. Per-chunk latency is measured
   from the chunk's scheduled send time to the ChunkAck that covers it, so a
   slow server cannot hide its tail behind late sends.
2. Saturation: streams sending long chunks as fast as their in-flight window
   allows; the figure is 512-sample VAD windows processed per second.
3. Raw model: Silero VAD's inner model called directly in a loop, with state,
   at the mean batch size the server reached in step 2.

Results go to stdout, to a JSON file and to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import wave
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEECH = REPO_ROOT / "media" / "audio" / "speech_sample.wav"
VAD_RATE = 16_000
WINDOW = 512


def load_speech_16k() -> np.ndarray:
    """Return the sample speech as 16 kHz PCM16, which the senders loop over."""
    with wave.open(str(SPEECH)) as file:
        rate = file.getframerate()
        samples = np.frombuffer(file.readframes(file.getnframes()), dtype="<i2")
    # 48 kHz to 16 kHz by averaging groups of three; good enough for load.
    factor = rate // VAD_RATE
    samples = samples[: len(samples) // factor * factor].reshape(-1, factor).mean(axis=1)
    return samples.astype("<i2")


@dataclasses.dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    port: int
    log: list[str]
    # Reads the server's output as it comes, so the pipe does not fill up
    # and block the server's logging.
    reader: threading.Thread

    def cpu_seconds(self) -> float:
        """CPU time of the server and its worker processes so far."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in [self.process.pid, *_children(self.process.pid)]:
            try:
                fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / ticks

    def stop(self) -> str:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.reader.join(timeout=10)
        return "\n".join(self.log)


def _children(pid: int) -> list[int]:
    found = []
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            found.extend([child, *_children(child)])
    return found


ECHO_SERVER = pathlib.Path(__file__).resolve().parent / "echo_server.py"


def start_server(extra_args: list[str], echo: bool = False, command: list[str] | None = None) -> ServerProcess:
    """Start ``streaminfer serve`` on a free port, the bare gRPC echo server when ``echo``, or ``command``.

    The server must print "streaminfer listening on HOST:PORT" when it is ready.
    """
    if command is None and echo:
        command = [sys.executable, str(ECHO_SERVER), "--port", "0"]
    elif command is None:
        command = [sys.executable, "-m", "streaminfer.server.cli", "serve", "--port", "0", "--metrics-port", "0", *extra_args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    deadline = time.monotonic() + 300
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("server exited before listening:\n" + "\n".join(log))
        log.append(line.rstrip())
        match = re.match(r"streaminfer listening on \S+:(\d+)", line)
        if match:
            reader = threading.Thread(target=lambda: log.extend(line.rstrip() for line in process.stdout), daemon=True)
            reader.start()
            return ServerProcess(process, int(match.group(1)), log, reader)
    raise TimeoutError("server did not start within 300 s")


def batch_stats(server_log: str, model: str) -> dict[str, float]:
    """Sum the batch figures each server process logs when it stops."""
    matches = re.findall(
        rf"model {model}: (\d+) batches, (\d+) items, mean batch size [\d.]+, closed full (\d+), "
        rf"closed by delay (\d+), inference ([\d.]+) s",
        server_log,
    )
    if not matches:
        return {}
    batches = sum(int(match[0]) for match in matches)
    items = sum(int(match[1]) for match in matches)
    return {
        "processes": len(matches),
        "batches": batches,
        "items": items,
        "mean_batch_size": round(items / batches, 1) if batches else 0.0,
        "closed_full": sum(int(match[2]) for match in matches),
        "closed_by_delay": sum(int(match[3]) for match in matches),
        "inference_seconds": round(sum(float(match[4]) for match in matches), 2),
    }


def audio_config(pb, model: str):
    """Return the StreamConfig of a stream that sends 16 kHz mono PCM16 to ``model``."""
    return pb.StreamConfig(
        models=[pb.ModelSelection(model=model)],
        audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=VAD_RATE),
    )


async def open_vad_stream(stub, pb):
    call = stub.Stream()
    await call.write(pb.StreamRequest(config=audio_config(pb, "silero_vad")))
    accepted = await call.read()
    return call, accepted.session_accepted


async def send_realtime(
    call, pb, speech: np.ndarray, index: int, first: float, interval: float, total_chunks: int, chunk_samples: int,
    scheduled: dict[int, float],
) -> None:
    """Write ``total_chunks`` chunks of the looped speech, chunk n at ``first + n * interval``, then half-close.

    Each chunk's scheduled time goes into ``scheduled`` just before its write.
    Streams start at different places in the speech (``index``).
    """
    async for seq, when, content in paced_chunks(speech, index, first, interval, total_chunks, chunk_samples):
        scheduled[seq] = when
        await call.write(pb.StreamRequest(audio=pb.AudioChunk(sequence_number=seq, audio_content=content)))
    await call.done_writing()


async def paced_chunks(
    speech: np.ndarray, index: int, first: float, interval: float, total_chunks: int, chunk_samples: int
) -> AsyncIterator[tuple[int, float, bytes]]:
    """Yield (sequence number, scheduled loop time, PCM16 bytes) of each chunk of the looped speech at its time.

    Chunk n is due at ``first + n * interval``. Streams start at different
    places in the speech (``index``).
    """
    loop = asyncio.get_running_loop()
    for seq in range(total_chunks):
        when = first + seq * interval
        delay = when - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        offset = (seq * chunk_samples + index * 997) % (len(speech) - chunk_samples)
        yield seq, when, speech[offset : offset + chunk_samples].tobytes()


async def read_answers(call, scheduled: dict[int, float], measure_from: float, latencies: list[float]) -> tuple[int, int]:
    """Read a call's responses to its end; return (chunks answered, chunk errors).

    Each acked chunk is removed from ``scheduled``; the latency from its
    scheduled time to the ack goes into ``latencies`` when it was scheduled at
    or after ``measure_from``.
    """
    import grpc

    loop = asyncio.get_running_loop()
    answered = errors = 0
    while (response := await call.read()) is not grpc.aio.EOF:
        now = loop.time()
        for ack in response.acks:
            for seq in range(ack.first_sequence_number, ack.last_sequence_number + 1):
                answered += 1
                when = scheduled.pop(seq)
                if when >= measure_from:
                    latencies.append(now - when)
        for error in response.errors:
            answered += 1
            errors += 1
            scheduled.pop(error.sequence_number, None)
    return answered, errors


async def realtime_load(target: str, streams: int, chunk_ms: int, warmup_s: float, measure_s: float) -> dict:
    import grpc

    from streaminfer.v1 import streaminfer_pb2 as pb
    from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

    speech = load_speech_16k()
    chunk_samples = VAD_RATE * chunk_ms // 1000
    interval = chunk_ms / 1000.0
    total_chunks = int((warmup_s + measure_s) / interval)
    latencies: list[float] = []
    errors = 0
    lost = 0

    async def one_stream(index: int, stub, start_at: float) -> None:
        nonlocal errors, lost
        call, _ = await open_vad_stream(stub, pb)
        scheduled: dict[int, float] = {}
        first = start_at + (index / streams) * interval

        sender = asyncio.create_task(
            send_realtime(call, pb, speech, index, first, interval, total_chunks, chunk_samples, scheduled)
        )
        answered, failed = await read_answers(call, scheduled, start_at + warmup_s, latencies)
        errors += failed
        await sender
        lost += total_chunks - answered

    options = [("grpc.max_receive_message_length", 16 << 20)]
    # Spread streams over several channels (HTTP/2 connections), as many
    # independent clients would be.
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(max(1, streams // 10))]
    stubs = [pb_grpc.InferenceServiceStub(channel) for channel in channels]
    loop = asyncio.get_running_loop()
    start_at = loop.time() + 1.0
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*(one_stream(i, stubs[i % len(stubs)], start_at) for i in range(streams)))
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    for channel in channels:
        await channel.close()
    values = np.array(latencies) * 1000.0
    return {
        "streams": streams,
        "chunk_ms": chunk_ms,
        "measured_seconds": measure_s,
        "chunks_measured": int(len(values)),
        "p50_ms": float(np.percentile(values, 50)) if len(values) else None,
        "p90_ms": float(np.percentile(values, 90)) if len(values) else None,
        "p99_ms": float(np.percentile(values, 99)) if len(values) else None,
        "max_ms": float(values.max()) if len(values) else None,
        "chunk_errors": errors,
        "chunks_unanswered": lost,
        "client_cpu_seconds": (usage_after.ru_utime + usage_after.ru_stime)
        - (usage_before.ru_utime + usage_before.ru_stime),
    }


async def saturate(
    target: str,
    streams: int,
    in_flight: int,
    config_for: Callable[[Any], Any],
    request_for: Callable[[Any, int, int], Any],
    warmup_s: float,
    measure_s: float,
    channels: int = 1,
) -> dict:
    """Keep ``in_flight`` chunks unacknowledged on each of ``streams`` streams; count chunks acknowledged per second.

    ``config_for(pb)`` returns the StreamConfig, ``request_for(pb, stream, seq)``
    the StreamRequest of a chunk. Only acks that arrive between the end of the
    warm-up and the end of the measurement count. Streams take the
    ``channels`` gRPC channels in turn.
    """
    import grpc

    from streaminfer.v1 import streaminfer_pb2 as pb
    from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from, measure_to = start + warmup_s, start + warmup_s + measure_s
    acked = errors = results = 0

    async def one_stream(index: int, stub) -> None:
        nonlocal acked, errors, results
        call = stub.Stream()
        await call.write(pb.StreamRequest(config=config_for(pb)))
        accepted = (await call.read()).session_accepted
        window = asyncio.Semaphore(min(in_flight, accepted.limits.max_chunks_in_flight or in_flight))

        async def send() -> None:
            seq = 0
            while loop.time() < measure_to:
                await window.acquire()
                await call.write(request_for(pb, index, seq))
                seq += 1
            await call.done_writing()

        sender = asyncio.create_task(send())
        # A failed send ends the call, so the read below cannot wait forever.
        sender.add_done_callback(lambda task: task.cancelled() or task.exception() is None or call.cancel())
        while (response := await call.read()) is not grpc.aio.EOF:
            now = loop.time()
            counting = measure_from <= now < measure_to
            for ack in response.acks:
                count = ack.last_sequence_number - ack.first_sequence_number + 1
                for _ in range(count):
                    window.release()
                if counting:
                    acked += count
            for _ in response.errors:
                errors += 1
                window.release()
            if counting:
                results += len(response.results)
        await sender
        if call.cancelled():
            raise RuntimeError("stream cancelled after a failed send")

    opened = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    stubs = [pb_grpc.InferenceServiceStub(channel) for channel in opened]
    await asyncio.gather(*(one_stream(i, stubs[i % len(stubs)]) for i in range(streams)))
    for channel in opened:
        await channel.close()
    return {
        "streams": streams,
        "chunks_in_flight": in_flight,
        "measured_seconds": measure_s,
        "chunks_per_second": acked / measure_s,
        "results_per_second": results / measure_s,
        "chunk_errors": errors,
    }


def audio_messages(model: str, samples: int) -> tuple[Callable[[Any], Any], Callable[[Any, int, int], Any]]:
    """Return ``saturate``'s (config_for, request_for) for chunks of ``samples`` samples of the 16 kHz speech."""
    speech = load_speech_16k()

    def request(pb, index: int, seq: int):
        # Streams start at different places in the speech.
        offset = (seq * samples + index * 997) % (len(speech) - samples)
        return pb.StreamRequest(
            audio=pb.AudioChunk(sequence_number=seq, audio_content=speech[offset : offset + samples].tobytes())
        )

    return (lambda pb: audio_config(pb, model)), request


async def saturation_load(
    target: str, streams: int, chunk_windows: int, in_flight: int, warmup_s: float, measure_s: float
) -> dict:
    """Saturate Silero VAD with chunks of ``chunk_windows`` windows; the figure is windows per second.

    The streams share four gRPC channels, as in the side-by-side suite: one
    HTTP/2 connection would reach only one of several server processes.
    """
    config, request = audio_messages("silero_vad", WINDOW * chunk_windows)
    result = await saturate(target, streams, in_flight, config, request, warmup_s, measure_s, channels=4)
    return {
        "streams": streams,
        "windows_per_chunk": chunk_windows,
        "chunks_in_flight": in_flight,
        "measured_seconds": measure_s,
        "windows_per_second": result["chunks_per_second"] * chunk_windows,
        "chunk_errors": result["chunk_errors"],
    }


def raw_model_throughput(batch_size: int, seconds: float, torch_threads: int) -> dict:
    import torch
    from silero_vad import load_silero_vad

    torch.set_num_threads(torch_threads)
    inner = load_silero_vad()._model
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((batch_size, 64 + WINDOW)).astype(np.float32) * 0.1)
    state = torch.zeros(2, batch_size, 128)
    iterations = 0
    with torch.inference_mode():
        for _ in range(5):
            inner(x, state)
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            _, state = inner(x, state)
            iterations += 1
        elapsed = time.perf_counter() - started
    return {"batch_size": batch_size, "windows_per_second": iterations * batch_size / elapsed, "torch_threads": torch_threads}


def machine_description() -> str:
    cpu = "unknown CPU"
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kb = int(pathlib.Path("/proc/meminfo").read_text().split()[1])
    return f"{os.cpu_count()} cores ({cpu}), {memory_kb / 1024 / 1024:.0f} GiB, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def config_without_admission() -> str:
    """Return the built-in server config with the stream cap and load shedding turned off."""
    from streaminfer.server.config import default_config_text

    text = default_config_text()
    for pattern, replacement in (
        (r"(?m)^max_streams = \d+$", "max_streams = 1000000"),
        (r"(?m)^max_queue_wait_ms = [\d.]+$", "max_queue_wait_ms = 0"),
        (r"(?m)^max_busy_fraction = [\d.]+$", "max_busy_fraction = 0"),
    ):
        text, count = re.subn(pattern, replacement, text)
        if count != 1:
            raise RuntimeError(f"the built-in config has {count} lines matching {pattern!r}, expected 1")
    return text


def run_phase(
    server_args: list[str], load, echo: bool = False, command: list[str] | None = None, model: str = "silero_vad"
) -> dict:
    """Start a server (see ``start_server``), run ``load(target)`` against it and stop it.

    The result gets the server's CPU seconds, the wall time and ``model``'s batch figures.
    """
    import uvloop

    server = start_server(server_args, echo, command)
    try:
        cpu_before = server.cpu_seconds()
        started = time.monotonic()
        result = uvloop.run(load(f"127.0.0.1:{server.port}"))
        result["server_cpu_seconds"] = server.cpu_seconds() - cpu_before
        result["wall_seconds"] = time.monotonic() - started
    finally:
        log = server.stop()
    result["server_batches"] = batch_stats(log, model)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--streams", default="100,150,200", help="concurrent real-time streams, comma-separated (default: 100,150,200)"
    )
    parser.add_argument(
        "--workers", default="1,2", help="server processes (`serve --workers`), comma-separated (default: 1,2)"
    )
    parser.add_argument("--chunk-ms", type=int, default=32, help="audio per chunk, milliseconds (default: 32)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per phase (default: 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first (default: 3)")
    parser.add_argument("--saturation-streams", type=int, default=128, help="streams in the saturation phase (default: 128)")
    parser.add_argument(
        "--saturation-windows", type=int, default=16, help="512-sample windows per chunk when saturating (default: 16)"
    )
    parser.add_argument(
        "--saturation-in-flight",
        type=int,
        default=2,
        help="unanswered chunks each saturating stream keeps in flight (default: 2)",
    )
    parser.add_argument(
        "--server-args", default="", help="extra `streaminfer serve` flags, quoted, e.g. \"--decode-threads 1\""
    )
    parser.add_argument("--skip-saturation", action="store_true", help="run the real-time phase only")
    parser.add_argument(
        "--skip-echo",
        action="store_true",
        help="skip the bare gRPC echo server that acknowledges each chunk at once (the transport ceiling)",
    )
    parser.add_argument("--json", type=pathlib.Path, default=REPO_ROOT / "bench-results" / "vad_streams.json")
    parser.add_argument("--markdown", type=pathlib.Path, default=REPO_ROOT / "BENCHMARKS.md")
    options = parser.parse_args()

    # This benchmark measures the pipeline up to saturation, so admission control is off:
    # the saturation phase fills the model queue on purpose.
    config_dir = tempfile.TemporaryDirectory()
    config_path = pathlib.Path(config_dir.name) / "server.toml"
    config_path.write_text(config_without_admission())
    options.server_args = f"--config {config_path} {options.server_args}"

    stream_counts = [int(value) for value in options.streams.split(",")]
    worker_counts = [int(value) for value in options.workers.split(",")]
    report: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(),
        "command": " ".join([pathlib.Path(sys.argv[0]).name, *sys.argv[1:]]),
        "warmup": options.warmup,
        "realtime": [],
        "saturation": [],
    }

    if not options.skip_echo:
        for streams in stream_counts:
            print(f"real time: echo baseline, {streams} streams x {options.chunk_ms} ms chunks ...", flush=True)
            result = run_phase(
                [],
                lambda target: realtime_load(target, streams, options.chunk_ms, options.warmup, options.seconds),
                echo=True,
            )
            result["workers"] = "echo"
            report["realtime"].append(result)
            print(f"  p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms", flush=True)

    for workers in worker_counts:
        server_args = ["--workers", str(workers), *options.server_args.split()]
        for streams in stream_counts:
            print(f"real time: {workers} worker(s), {streams} streams x {options.chunk_ms} ms chunks ...", flush=True)
            result = run_phase(
                server_args,
                lambda target: realtime_load(target, streams, options.chunk_ms, options.warmup, options.seconds),
            )
            result["workers"] = workers
            report["realtime"].append(result)
            print(
                f"  p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                f"mean batch {result['server_batches'].get('mean_batch_size', 0):.1f}",
                flush=True,
            )
        if options.skip_saturation:
            continue
        print(f"saturation: {workers} worker(s), {options.saturation_streams} streams ...", flush=True)
        result = run_phase(
            server_args,
            lambda target: saturation_load(
                target,
                options.saturation_streams,
                options.saturation_windows,
                options.saturation_in_flight,
                options.warmup,
                options.seconds,
            ),
        )
        result["workers"] = workers
        report["saturation"].append(result)
        print(f"  {result['windows_per_second']:.0f} windows/s", flush=True)

    if report["saturation"]:
        # The raw model runs at the batch size one server process reached.
        batch = max(1, round(report["saturation"][0]["server_batches"].get("mean_batch_size", 1)))
        torch_threads = max(1, (os.cpu_count() or 1) - 1)
        print(f"raw model: batch {batch}, {torch_threads} torch thread(s) ...", flush=True)
        report["raw_model"] = raw_model_throughput(batch, options.seconds / 2, torch_threads)
        for result in report["saturation"]:
            result["served_to_raw_ratio"] = result["windows_per_second"] / report["raw_model"]["windows_per_second"]
        print(f"  {report['raw_model']['windows_per_second']:.0f} windows/s", flush=True)

    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(options.markdown, report)
    print(f"wrote {options.json} and {options.markdown}")
    return 0


def _mean_batch(batches: dict) -> str:
    return f"{batches['mean_batch_size']:.1f}" if batches else "-"


def _cpu_percent(result: dict, key: str) -> str:
    return f"{100 * result[key] / result['wall_seconds']:.0f}"


def write_markdown(path: pathlib.Path, report: dict) -> None:
    """Replace this benchmark's section of BENCHMARKS.md, keeping the others."""
    rows = []
    for result in report["realtime"]:
        batches = result.get("server_batches", {})
        rows.append(
            f"| {result['workers']} | {result['streams']} | {result['chunks_measured']} | {result['p50_ms']:.1f} | "
            f"{result['p90_ms']:.1f} | {result['p99_ms']:.1f} | {result['max_ms']:.1f} | {result['chunk_errors']} | "
            f"{result['chunks_unanswered']} | {_mean_batch(batches)} | "
            f"{_cpu_percent(result, 'server_cpu_seconds')} | {_cpu_percent(result, 'client_cpu_seconds')} |"
        )
    first = report["realtime"][0]
    section = f"""## VAD streams (`make bench`)

Date {report['date']}. Machine: {report['machine']}. The load generator and the server share it.
Command: `{report['command']}`.

Real time: each stream sends one {first['chunk_ms']} ms 16 kHz PCM16 chunk of real speech every
{first['chunk_ms']} ms to Silero VAD. Latency runs from each chunk's scheduled send time to the ChunkAck
that covers it, over {first['measured_seconds']:.0f} s after a {report.get('warmup', 3)} s warm-up, so a late
sender counts against the server. CPU % is CPU time over the phase's wall time, stream setup included
(100 % = one core). Rows marked `echo` are the transport ceiling: a bare grpc.aio server
(benchmarks/echo_server.py) that answers each chunk with its ack at once, with no decoding,
batching or model, measured in the same run with the same load generator.

| workers | streams | chunks measured | p50 ms | p90 ms | p99 ms | max ms | chunk errors | unanswered | mean batch | server CPU % | client CPU % |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}
"""
    if report["saturation"]:
        raw = report["raw_model"]
        saturation_rows = []
        for result in report["saturation"]:
            batches = result.get("server_batches", {})
            saturation_rows.append(
                f"| {result['workers']} | {result['windows_per_second']:.0f} | {batches.get('mean_batch_size', float('nan')):.1f} | "
                f"{raw['windows_per_second']:.0f} | {result['served_to_raw_ratio']:.2f} | {result['chunk_errors']} | "
                f"{_cpu_percent(result, 'server_cpu_seconds')} |"
            )
        sample = report["saturation"][0]
        section += f"""
Saturation: {sample['streams']} streams each keep {sample['chunks_in_flight']} chunks of {sample['windows_per_chunk']} VAD windows
in flight, as fast as the server answers. The raw model is Silero VAD's inner model called directly
in a loop, with state, at batch {raw['batch_size']} (the mean batch of one server process) and
{raw['torch_threads']} torch thread(s), in the same run.

| workers | served windows/s | mean batch | raw model windows/s | served / raw | chunk errors | server CPU % |
| --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(saturation_rows)}
"""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    marker = "## VAD streams (`make bench`)"
    if marker in text:
        before, _, rest = text.partition(marker)
        after = rest.split("\n## ", 1)
        text = before + section + ("\n## " + after[1] if len(after) > 1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
