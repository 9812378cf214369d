"""The benchmark suite's own parts: the plain baseline server and a short run of the suite."""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import sys
import tomllib

import grpc
import pytest

from streaminfer.server import load
from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = REPO_ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import vad_streams  # noqa: E402


def start_baseline() -> vad_streams.ServerProcess:
    return vad_streams.start_server([], command=[sys.executable, str(BENCHMARKS / "baseline_server.py"), "--port", "0"])


def audio_config(rate: int) -> pb.StreamRequest:
    return pb.StreamRequest(
        config=pb.StreamConfig(
            models=[pb.ModelSelection(model="silero_vad")],
            audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=rate),
        )
    )


def test_baseline_acks_every_chunk():
    server = start_baseline()
    try:
        speech = vad_streams.load_speech_16k()
        chunks = [speech[i * 512 : (i + 1) * 512] for i in range(150)]

        async def run():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                call = pb_grpc.InferenceServiceStub(channel).Stream()
                await call.write(audio_config(16000))
                for number, chunk in enumerate(chunks):
                    await call.write(pb.StreamRequest(audio=pb.AudioChunk(sequence_number=number, audio_content=chunk.tobytes())))
                await call.done_writing()
                return [response async for response in call], await call.code()

        responses, code = asyncio.run(run())
    finally:
        server.stop()
    assert code == grpc.StatusCode.OK
    assert responses[0].session_accepted.stream_id.startswith("baseline-")
    acked = [number for response in responses for ack in response.acks for number in range(ack.first_sequence_number, ack.last_sequence_number + 1)]
    assert acked == list(range(150))
    events = [result.speech.event_type for response in responses for result in response.results]
    assert pb.SPEECH_EVENT_TYPE_SPEECH_START in events
    end = responses[-1].stream_end
    assert end.reason == pb.STREAM_END_REASON_INPUT_ENDED
    assert end.totals[0].chunks_acked == 150
    assert end.results_sent == len(events)


def test_baseline_rejects_other_formats():
    server = start_baseline()
    try:

        async def run():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                call = pb_grpc.InferenceServiceStub(channel).Stream()
                await call.write(audio_config(48000))
                await call.done_writing()
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await call.read()
                return raised.value

        error = asyncio.run(run())
    finally:
        server.stop()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.audio_format" in error.details()
    assert "48000" in error.details()


def noop_chunk_responses(port: int, chunks: int) -> list[pb.StreamResponse]:
    """Send ``chunks`` 512-sample chunks to noop_audio one at a time; return the response to each."""

    async def run():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb_grpc.InferenceServiceStub(channel).Stream()
            await call.write(
                pb.StreamRequest(
                    config=pb.StreamConfig(
                        models=[pb.ModelSelection(model="noop_audio")],
                        audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=16000),
                    )
                )
            )
            await call.read()
            responses = []
            for number in range(chunks):
                await call.write(pb.StreamRequest(audio=pb.AudioChunk(sequence_number=number, audio_content=bytes(1024))))
                responses.append(await call.read())
            await call.done_writing()
            return responses

    return asyncio.run(run())


def test_echo_results_match_noop_model(tmp_path):
    import suite

    config = tmp_path / "server.toml"
    config.write_text(suite.server_config())
    servers = [
        vad_streams.start_server([], command=[*suite.ECHO_COMMAND, "--results"]),
        vad_streams.start_server(["--config", str(config)]),
    ]
    try:
        echo, served = (noop_chunk_responses(server.port, 3) for server in servers)
    finally:
        for server in servers:
            server.stop()

    assert echo == served
    assert [response.results[0].start_time.ToMilliseconds() for response in echo] == [0, 32, 64]
    assert [response.acks[0].first_sequence_number for response in echo] == [0, 1, 2]


def test_suite_transport_writes_report(tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\n## Other section\n\nkept\n")
    completed = subprocess.run(
        [
            sys.executable, str(BENCHMARKS / "suite.py"), "--only", "transport", "--seconds", "1", "--warmup", "0.5",
            "--transport-streams", "8", "--json", str(tmp_path / "suite.json"), "--plot", str(tmp_path / "suite.png"),
            "--markdown", str(markdown),
        ],
        capture_output=True, text=True, timeout=600, cwd=BENCHMARKS,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    report = json.loads((tmp_path / "suite.json").read_text())
    transport = report["transport"]
    assert transport["streams"] == 8
    assert transport["chunk_bytes"] == 1024
    assert transport["echo_messages_per_second"] > 0
    assert transport["served_messages_per_second"] > 0
    assert transport["ratio"] == pytest.approx(transport["served_messages_per_second"] / transport["echo_messages_per_second"])
    assert transport["chunk_errors"] == 0
    text = markdown.read_text()
    assert "## Other section\n\nkept" in text
    assert "| transport: messages/s, 8 streams, 1024-byte chunks |" in text
    # A second run replaces the section instead of adding another.
    completed = subprocess.run(completed.args, capture_output=True, text=True, timeout=600, cwd=BENCHMARKS)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert markdown.read_text().count("## Side by side") == 1


@pytest.fixture(scope="module")
def peer_proto(tmp_path_factory):
    import ray_peer

    folder = tmp_path_factory.mktemp("peer_proto")
    ray_peer.compile_proto(folder)
    sys.path.insert(0, str(folder))
    try:
        import vad_peer_pb2

        yield vad_peer_pb2
    finally:
        sys.path.remove(str(folder))


def test_ray_peer_batch_keeps_stream_order(peer_proto):
    # The Ray Serve peer's batch logic, without Ray: a batch that contains two
    # chunks of one stream must give what the chunks give one at a time.
    import ray_peer

    speech = vad_streams.load_speech_16k()

    def request(stream: str, number: int):
        # Different audio per stream, so states that crossed streams would show.
        start = number + (20 if stream == "a" else 0)
        window = speech[start * 512 : (start + 1) * 512]
        return peer_proto.DetectRequest(stream_id=stream, sequence_number=number, audio_content=window.tobytes())

    one_by_one = ray_peer.PeerVad(1)
    expected = [
        one_by_one.detect([request(stream, number)], peer_proto.DetectResponse)[0].speech_probability
        for number in range(3)
        for stream in ("a", "b")
    ]

    batched = ray_peer.PeerVad(1)
    first = batched.detect([request("a", 0), request("b", 0), request("a", 1)], peer_proto.DetectResponse)
    second = batched.detect([request("b", 1), request("a", 2), request("b", 2)], peer_proto.DetectResponse)
    got = {(response.sequence_number, stream): response.speech_probability for response, stream in zip(first, "aba")}
    got |= {(response.sequence_number, stream): response.speech_probability for response, stream in zip(second, "bab")}

    assert [response.sequence_number for response in first] == [0, 0, 1]
    assert batched.streams == 2
    assert [got[(number, stream)] for number in range(3) for stream in ("a", "b")] == pytest.approx(expected, abs=1e-5)
    assert expected[0::2] != pytest.approx(expected[1::2], abs=1e-3)


def test_ray_peer_rejects_partial_window(peer_proto):
    import ray_peer

    vad = ray_peer.PeerVad(1)
    short = peer_proto.DetectRequest(stream_id="a", sequence_number=0, audio_content=bytes(100))
    with pytest.raises(ValueError, match="audio_content has 100 bytes"):
        vad.detect([short], peer_proto.DetectResponse)


@pytest.mark.skipif(load.loop_sampling_unavailable() is not None, reason="the event loop cannot be sampled from /proc here")
def test_loop_sampler_cost_prints_ratio():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "loop_sampler_cost.py"), "--rounds", "1", "--seconds", "0.3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "round 1/1:" in result.stdout
    assert "busy), ratio" in result.stdout
    ratio = float(result.stdout.rsplit("median ratio with / without the sampler: ", 1)[1])
    # The sampler takes a small share of a busy thread's time; a ratio far from 1 means a broken run.
    assert 0.5 < ratio < 1.5


def test_goodput_finds_metrics_address():
    import goodput

    log = ["streaminfer listening on 127.0.0.1:50123", "streaminfer metrics on http://127.0.0.1:50124/metrics"]
    assert goodput.metrics_url(log) == "http://127.0.0.1:50124/metrics"
    with pytest.raises(RuntimeError):
        goodput.metrics_url(log[:1])


def test_goodput_on_mode_busy_check():
    import goodput

    on = tomllib.loads(goodput.server_config("on", 190, 100.0, 0.75, 0.8))["admission"]
    assert on["max_streams"] == 190
    assert on["max_busy_fraction"] == 0.8
    assert tomllib.loads(goodput.server_config("on", 190, 100.0, 0.75))["admission"]["max_busy_fraction"] == 0
    shed = tomllib.loads(goodput.server_config("shed", 190, 100.0, 0.75, 0.8))["admission"]
    assert shed["max_busy_fraction"] == 0.75
    off = tomllib.loads(goodput.server_config("off", 190, 100.0, 0.75, 0.8))["admission"]
    assert (off["max_queue_wait_ms"], off["max_busy_fraction"]) == (0, 0)


def test_goodput_section_names_the_settings():
    import goodput

    report = {
        "command": "python benchmarks/goodput.py",
        "machine": "test machine",
        "date": "2026-12-05",
        "duration_s": 8.0,
        "ramp_s": 2.0,
        "warmup_s": 1.0,
        "chunk_ms": 32,
        "budget_ms": 150.0,
        "max_streams": 190,
        "max_queue_wait_ms": 100.0,
        "max_busy_fraction": 0.75,
        "inference_cpus": "1",
        "on_max_busy_fraction": 0.8,
        "sweeps": {},
        "summary": {"peak_goodput": 0, "top_offered": 600, "top": {}},
    }
    section = goodput.markdown(report)
    assert "`admission.max_busy_fraction = 0.8`. A fixed cap does not follow the machine's speed. Shedding only" in section
    assert "`admission.max_streams = 190` (sized from an earlier run of this benchmark)," in section
    assert "Every server ran with `--inference-cpus 1`." in section
    report["on_max_busy_fraction"] = 0.0
    report["inference_cpus"] = ""
    section = goodput.markdown(report)
    assert "`admission.max_queue_wait_ms = 100`, the busy-fraction check off. A fixed cap" in section
    assert "--inference-cpus" not in section
    assert "`admission.max_busy_fraction = 0.75`, `admission" in section
    report["max_busy_fraction"] = 0.8
    assert "`admission.max_busy_fraction = 0.8` (the default), `admission" in goodput.markdown(report)
    report["max_streams"] = 100
    assert "`admission.max_streams = 100`, `admission" in goodput.markdown(report)


def test_suite_limit_rows_name_pinning():
    import suite

    row = {
        "model": "silero_vad",
        "unit": "512-sample windows",
        "served_per_second": 35_515.0,
        "mean_batch": 125.2,
        "raw_batch": 125,
        "raw_per_second": 41_900.0,
        "ratio": 0.8476,
        "target": 0.85,
    }
    report = {
        "budget_ms": 100.0,
        "date": "2026-12-05",
        "machine": "test machine",
        "command": "suite.py",
        "limit": [dict(row, inference_cpus=""), dict(row, inference_cpus="1-3")],
    }
    lines = suite.markdown(report).splitlines()
    default = next(line for line in lines if line.startswith("| limit: silero_vad at saturation, 512"))
    pinned = next(line for line in lines if "`--inference-cpus 1-3`, load generator off those CPUs" in line)
    # Three decimals, so that a ratio just under the target does not read as meeting it.
    assert "| 0.848 | 0.85 | missed |" in default
    assert "| 0.848 | 0.85 | missed |" in pinned


def test_goodput_row_rejection_and_speed():
    import goodput

    row = {
        "offered": 600, "admitted": 190, "rejected": {"UNAVAILABLE": 410}, "goodput": 188,
        "p50_ms": 40.0, "p99_ms": 103.0, "health_p99_ms": 88.0, "health_max_ms": 97.0, "health_failures": 0,
        "busy_fraction": 0.86, "server_cpu_percent": 108, "server_rss_mib": 643.1,
        "rejection_p50_ms": 312.4, "rejection_max_ms": 905.0, "speed_probe_ms": 7.5,
    }  # fmt: skip
    calm = dict(row, offered=200, admitted=200, rejected={}, goodput=200, rejection_p50_ms=None, rejection_max_ms=None,
                speed_probe_ms=5.0)  # fmt: skip
    report = {
        "command": "python benchmarks/goodput.py", "machine": "test machine", "date": "2026-12-05",
        "duration_s": 8.0, "ramp_s": 2.0, "warmup_s": 1.0, "chunk_ms": 32, "budget_ms": 150.0, "max_streams": 190,
        "max_queue_wait_ms": 100.0, "max_busy_fraction": 0.8, "inference_cpus": "", "on_max_busy_fraction": 0.0,
        "sweeps": {"shed": [calm, row]},
        "summary": {"peak_goodput": 200, "top_offered": 600, "top": {}},
    }  # fmt: skip
    section = goodput.markdown(report)
    # Speed is the fastest probe (5.0 ms) over the level's own: 5.0 / 7.5.
    assert "| shedding only | 600 | 190 | 410 UNAVAILABLE | 312 / 905 | 188 | 40 | 103 | 88 / 97 | 0.86 | 108 | 643.1 | 0.67 |" in section
    assert "| shedding only | 200 | 200 | 0 | - | 200 |" in section
    assert section.rstrip().endswith("The machine's speed probes ranged from 0.67 to 1.00 of the fastest.\n" + goodput.SECTION_END)


def test_speed_probe_takes_median_round(monkeypatch: pytest.MonkeyPatch):
    import goodput

    # Each round reads the clock twice: rounds of 1, 3 and 2 s.
    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])
    monkeypatch.setattr(goodput.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(goodput, "SPEED_PROBE_ROUNDS", 3)
    monkeypatch.setattr(goodput, "SPEED_PROBE_ADDITIONS", 10)
    monkeypatch.setattr(goodput, "SPEED_PROBE_PAUSE_S", 0.0)
    assert goodput.speed_probe_ms() == 2000.0


def test_goodput_level_times_real_rejections():
    import argparse

    import goodput

    args = argparse.Namespace(ramp_s=0.3, duration_s=1.5, warmup_s=0.5, budget_ms=150.0, chunk_ms=32, inference_cpus="")
    (row,) = goodput.run_sweep("cap 2", goodput.server_config("on", 2, 0.0, 0.0), [12], args, measure_busy=False)
    assert row["admitted"] == 2
    assert row["rejected"] == {"UNAVAILABLE": 10}
    assert row["unexpected_rejections"] == []
    assert row["rejection_p50_ms"] > 0.0
    assert row["rejection_max_ms"] >= row["rejection_p50_ms"]
    assert row["speed_probe_ms"] > 0.0
    # The health probe process checked the server all through the level, and it answered SERVING.
    assert row["health_checks"] >= 10
    assert row["health_failures"] == 0
    assert 0.0 < row["health_p99_ms"] <= row["health_max_ms"]
