"""Checks of the load-tool files under loadtest/: ghz configs, k6 script, Locust user.

ghz and k6 are not installed where these tests run, so their files are checked
statically: option names against ghz's documented config keys, every message
against the proto with json_format.ParseDict, and the k6 script with
``node --check`` and a run under Node with small stand-ins for the k6 modules.
The Locust user runs for real against an in-process server when Locust is
installed.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
from google.protobuf import json_format

from streaminfer.v1 import streaminfer_pb2 as pb

from conftest import ServerThread, loopback_config

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
GHZ_DIR = REPO_ROOT / "loadtest" / "ghz"
K6_DIR = REPO_ROOT / "loadtest" / "k6"
LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"
METHOD_PATH = "streaminfer.v1.InferenceService/Stream"

# The keys ghz reads from a JSON config file: the `json:"..."` tags of ghz's
# runner.Config (github.com/bojand/ghz, runner/config.go) together with the
# options documented in www/docs/options.md and www/docs/example_config.md.
GHZ_CONFIG_KEYS = frozenset(
    {
        "proto", "protoset", "call", "import-paths",
        "cacert", "cert", "key", "cname", "skipTLS", "insecure", "authority",
        "async", "rps",
        "load-schedule", "load-start", "load-end", "load-step", "load-step-duration", "load-max-duration",
        "concurrency", "concurrency-schedule", "concurrency-start", "concurrency-end",
        "concurrency-step", "concurrency-step-duration", "concurrency-max-duration",
        "total", "timeout", "duration", "max-duration", "duration-stop",
        "data", "data-file", "binary-file", "metadata", "metadata-file",
        "stream-interval", "stream-call-duration", "stream-call-count", "stream-dynamic-messages",
        "reflect-metadata",
        "output", "format", "skipFirst", "count-errors",
        "connections", "connect-timeout", "keepalive", "enable-compression",
        "name", "tags", "cpus", "debug", "host",
    }
)  # fmt: skip
GHZ_DURATION_KEYS = ("timeout", "duration", "max-duration", "stream-interval", "stream-call-duration", "connect-timeout")

PCM16_CHUNK_16K_32MS = 16_000 * 32 // 1000 * 2  # 1024 bytes


def ghz_configs() -> list[pathlib.Path]:
    return sorted(path for path in GHZ_DIR.glob("*.json") if path.name != "audio_messages.json")


def check_stream(messages: list[dict]) -> list[pb.StreamRequest]:
    """Parse proto3-JSON messages strictly and check the stream's shape."""
    assert messages, "no messages"
    parsed = [json_format.ParseDict(message, pb.StreamRequest()) for message in messages]
    assert parsed[0].WhichOneof("request") == "config"
    assert parsed[-1].WhichOneof("request") == "control"
    assert parsed[-1].control.action == pb.CONTROL_ACTION_END_OF_INPUT
    audio = [request.audio for request in parsed[1:-1]]
    assert all(request.WhichOneof("request") == "audio" for request in parsed[1:-1])
    sequence = [chunk.sequence_number for chunk in audio]
    assert sequence == sorted(set(sequence)), "sequence numbers must strictly increase"
    channels = parsed[0].config.audio_format.audio_channel_count or 1
    for chunk in audio:
        assert chunk.audio_content and len(chunk.audio_content) % (2 * channels) == 0
    return parsed


def service_methods() -> set[str]:
    service = pb.DESCRIPTOR.services_by_name["InferenceService"]
    return {f"{service.full_name}/{method.name}" for method in service.methods}


# ---------------------------------------------------------------- ghz


def test_ghz_configs_use_documented_keys_and_loopback() -> None:
    configs = ghz_configs()
    assert {path.name for path in configs} >= {"stream_audio_duration.json", "stream_audio_binary.json"}
    for path in configs:
        config = json.loads(path.read_text())
        unknown = set(config) - GHZ_CONFIG_KEYS
        assert not unknown, f"{path.name}: keys ghz does not document: {sorted(unknown)}"
        assert config["call"] == METHOD_PATH
        assert config["call"] in service_methods()
        assert config["host"] == "127.0.0.1:50051"
        assert config["insecure"] is True
        assert "proto" not in config, "must use server reflection"
        assert "protoset" not in config, "must use server reflection"
        assert config["stream-interval"] == "32ms"
        assert ("duration" in config) or ("total" in config)
        assert 1 <= config["connections"] <= config["concurrency"]
        for key in GHZ_DURATION_KEYS:
            if key in config:
                assert re.fullmatch(r"\d+(ms|s|m|h)", config[key]), f"{key}: {config[key]} is not a Go duration"
        data_keys = {"data", "data-file", "binary-file"} & set(config)
        assert len(data_keys) == 1, f"{path.name}: exactly one data source, got {data_keys}"
        data_file = config.get("data-file") or config.get("binary-file")
        assert (REPO_ROOT / data_file).is_file(), f"{data_file} is relative to the repository root"


def test_ghz_json_messages_decode_as_stream_requests() -> None:
    messages = json.loads((GHZ_DIR / "audio_messages.json").read_text())
    parsed = check_stream(messages)
    config = parsed[0].config
    assert config.audio_format.encoding == pb.AUDIO_ENCODING_LINEAR16
    assert config.audio_format.sample_rate_hertz == 16_000
    assert [model.model for model in config.models] == ["silero_vad"]
    audio = [request.audio for request in parsed[1:-1]]
    assert [chunk.sequence_number for chunk in audio] == list(range(len(audio)))
    assert all(len(chunk.audio_content) == PCM16_CHUNK_16K_32MS for chunk in audio)
    # speech_sample.wav is 9.54 s long: 298 whole chunks of 32 ms.
    assert len(audio) == 298
    # Real audio, not silence: some chunk has a sample far from zero.
    peak = max(max(abs(int.from_bytes(c.audio_content[i : i + 2], "little", signed=True)) for i in range(0, 1024, 2)) for c in audio)
    assert peak > 1000


def read_count_delimited(data: bytes) -> list[pb.StreamRequest]:
    messages = []
    offset = 0
    for _ in range(100_000):
        if offset >= len(data):
            break
        length = shift = 0
        while True:
            byte = data[offset]
            offset += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        assert offset + length <= len(data), "truncated message"
        messages.append(pb.StreamRequest.FromString(data[offset : offset + length]))
        offset += length
    assert offset == len(data)
    return messages


def test_ghz_binary_messages_match_json() -> None:
    from_bin = read_count_delimited((GHZ_DIR / "audio_messages.bin").read_bytes())
    from_json = [json_format.ParseDict(m, pb.StreamRequest()) for m in json.loads((GHZ_DIR / "audio_messages.json").read_text())]
    assert len(from_bin) == len(from_json) == 300
    assert from_bin == from_json


def test_make_messages_is_reproducible(tmp_path: pathlib.Path) -> None:
    subprocess.run(
        [sys.executable, str(GHZ_DIR / "make_messages.py"), "--out-dir", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    for name in ("audio_messages.json", "audio_messages.bin"):
        assert (tmp_path / name).read_bytes() == (GHZ_DIR / name).read_bytes(), f"{name} is stale: rerun make_messages.py"


# ---------------------------------------------------------------- k6

K6_SCRIPTS = sorted(K6_DIR.glob("*.js"))
K6_DOCUMENTED_MODULES = {"k6", "k6/net/grpc", "k6/metrics", "k6/data", "k6/encoding", "k6/timers"}


@pytest.fixture(scope="module")
def node() -> str:
    path = shutil.which("node")
    if path is None:
        pytest.skip("node is not installed")
    return path


def test_k6_scripts_exist() -> None:
    assert [path.name for path in K6_SCRIPTS] == ["stream_audio.js"]


@pytest.mark.parametrize("script", K6_SCRIPTS, ids=lambda path: path.name)
def test_k6_script_syntax(script: pathlib.Path, node: str, tmp_path: pathlib.Path) -> None:
    # k6 scripts are ES modules; a .mjs copy makes node parse them as one.
    copy = tmp_path / (script.stem + ".mjs")
    copy.write_text(script.read_text())
    result = subprocess.run([node, "--check", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    imported = {line.split("from")[-1].strip(" ';\"") for line in text.splitlines() if line.startswith("import ")}
    assert imported <= K6_DOCUMENTED_MODULES, imported - K6_DOCUMENTED_MODULES
    assert "reflect: true" in text
    assert "plaintext: true" in text
    assert "open(WAV_PATH, 'b')" in text
    assert "'127.0.0.1:50051'" in text


def test_k6_templates_are_valid_stream_requests() -> None:
    templates = json.loads((K6_DIR / "messages.json").read_text())
    assert templates["method"] == METHOD_PATH
    assert templates["method"] in service_methods()
    assert templates["chunkMs"] == 32
    chunk = base64.b64encode(b"\x01\x00" * 1536).decode()
    audio = json.loads(json.dumps(templates["audio"]))
    audio["audio"]["audioContent"] = chunk
    audio["audio"]["sequenceNumber"] = "7"
    check_stream([templates["config"], audio, templates["endOfInput"]])


# Stand-ins for the k6 modules the script imports, enough to run one iteration
# under Node: the Stream records every write and acknowledges each audio chunk with
# an ack a few ms later (chunk 3 with a DEADLINE error), as the server would.
K6_STUBS = {
    "grpc.mjs": """
        export const log = { connect: [], method: null, writes: [], ended: false, endedAt: 0 };
        export class Client { connect(addr, params) { log.connect.push({ addr, params }); } }
        export class Stream {
          constructor(client, method) { log.method = method; this.handlers = {}; }
          on(event, handler) { this.handlers[event] = handler; }
          emit(event, value) { if (this.handlers[event]) this.handlers[event](value); }
          write(message) {
            log.writes.push({ t: Date.now(), message: JSON.parse(JSON.stringify(message)) });
            if (message.audio) {
              const seq = message.audio.sequenceNumber;
              setTimeout(() => {
                if (seq === '3') {
                  this.emit('data', { results: [], acks: [], errors: [
                    { modality: 'MODALITY_AUDIO', sequenceNumber: seq, reason: 'CHUNK_ERROR_REASON_DEADLINE' }] });
                } else {
                  this.emit('data', { results: [{ model: 'silero_vad' }], errors: [], acks: [
                    { modality: 'MODALITY_AUDIO', firstSequenceNumber: seq, lastSequenceNumber: seq }] });
                }
              }, 5);
            }
          }
          end() {
            log.ended = true; log.endedAt = Date.now();
            setTimeout(() => { this.emit('data', { streamEnd: {} }); this.emit('end'); }, 10);
          }
        }
    """,
    "metrics.mjs": """
        export const samples = {};
        class Metric {
          constructor(name) { this.name = name; samples[name] = []; }
          add(value, tags) { samples[this.name].push({ value: Number(value), tags: tags || {} }); }
        }
        export class Trend extends Metric {}
        export class Counter extends Metric {}
        export class Rate extends Metric {}
    """,
    "data.mjs": "export class SharedArray { constructor(name, make) { return make(); } }",
    "encoding.mjs": "export function b64encode(data) { return Buffer.from(data).toString('base64'); }",
    "timers.mjs": "export const setTimeout = globalThis.setTimeout;",
}
K6_HARNESS = """
    import fs from 'node:fs';
    import path from 'node:path';
    const scriptDir = process.env.K6_SCRIPT_DIR;
    globalThis.__ENV = { MAX_SECONDS: '0.5' };
    globalThis.open = (file, mode) => {
      const data = fs.readFileSync(path.resolve(scriptDir, file));
      return mode === 'b' ? data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength) : data.toString('utf8');
    };
    const { log } = await import('k6/net/grpc');
    const { samples } = await import('k6/metrics');
    const script = await import('./script.mjs');
    const started = Date.now();
    script.default();
    const deadline = Date.now() + 10000;
    while (!log.ended && Date.now() < deadline) { await new Promise((r) => setTimeout(r, 20)); }
    await new Promise((r) => setTimeout(r, 100));
    console.log(JSON.stringify({ log, samples, started, options: script.options }));
"""


def test_k6_script_runs_one_stream_with_stub_modules(node: str, tmp_path: pathlib.Path) -> None:
    package = tmp_path / "node_modules" / "k6"
    package.mkdir(parents=True)
    exports = {f"./{name.removesuffix('.mjs').replace('grpc', 'net/grpc')}": f"./{name}" for name in K6_STUBS}
    (package / "package.json").write_text(json.dumps({"name": "k6", "type": "module", "exports": exports}))
    for name, body in K6_STUBS.items():
        (package / name).write_text(textwrap.dedent(body))
    (tmp_path / "script.mjs").write_text((K6_DIR / "stream_audio.js").read_text())
    (tmp_path / "harness.mjs").write_text(textwrap.dedent(K6_HARNESS))
    result = subprocess.run(
        [node, str(tmp_path / "harness.mjs")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "K6_SCRIPT_DIR": str(K6_DIR)},
    )
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout.strip().splitlines()[-1])
    log, samples = run["log"], run["samples"]

    assert log["connect"] == [{"addr": "127.0.0.1:50051", "params": {"plaintext": True, "reflect": True, "timeout": "10s"}}]
    assert log["method"] == METHOD_PATH
    assert log["ended"]
    messages = [write["message"] for write in log["writes"]]
    parsed = check_stream(messages)
    rate = parsed[0].config.audio_format.sample_rate_hertz
    assert rate == 48_000  # speech_sample.wav's own rate, read from its header
    audio_writes = log["writes"][1:-1]
    # MAX_SECONDS=0.5 at 32 ms a chunk: 15 whole chunks of 48000 * 0.032 * 2 bytes.
    assert len(audio_writes) == 15
    assert all(len(base64.b64decode(w["message"]["audio"]["audioContent"])) == 3072 for w in audio_writes)
    # Real-time pacing: chunk i leaves about 32 ms * i after chunk 0, never early.
    first = audio_writes[0]["t"]
    for index, write in enumerate(audio_writes):
        assert write["t"] - first >= index * 32 - 2
        assert write["t"] - first <= index * 32 + 200
    assert log["endedAt"] - first >= 14 * 32

    assert len(samples["chunk_latency"]) == 14  # every chunk except the one that got a ChunkError
    assert all(0 <= s["value"] < 1000 for s in samples["chunk_latency"])
    assert len(samples["time_to_first_result"]) == 1
    assert samples["chunk_errors"] == [{"value": 1, "tags": {"reason": "CHUNK_ERROR_REASON_DEADLINE"}}]
    assert sorted(s["value"] for s in samples["chunk_error_rate"]) == [0] * 14 + [1]
    assert samples["chunks_unanswered"] == []
    assert samples["stream_errors"] == []

    options = run["options"]
    executors = {scenario["executor"] for scenario in options["scenarios"].values()}
    assert "constant-vus" in executors
    assert executors & {"constant-arrival-rate", "ramping-arrival-rate"}
    assert "p(99)<100" in options["thresholds"]["chunk_latency"]
    assert any(t.startswith("rate<") for t in options["thresholds"]["chunk_error_rate"])


# ---------------------------------------------------------------- Locust


def test_locust_user_reports_stream_events(tmp_path: pathlib.Path) -> None:
    # find_spec, not import: importing locust monkey-patches this process with gevent.
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed (add it to the dev extras to run this test)")
    locust_bin = pathlib.Path(sys.executable).parent / "locust"
    assert locust_bin.exists()

    server = ServerThread(loopback_config()).start()
    try:
        result = subprocess.run(
            [str(locust_bin), "-f", str(LOCUSTFILE), "--headless", "-u", "2", "-r", "2", "-t", "5s",
             "--host", server.target, "--json", "--only-summary", "--stop-timeout", "5"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={**os.environ, "STREAMINFER_MAX_SECONDS": "1.5"},
        )  # fmt: skip
    finally:
        server.stop()

    assert result.returncode == 0, result.stderr[-3000:]
    stats = {entry["name"]: entry for entry in json.loads(result.stdout)}
    assert set(stats) == {"chunk", "time to first result", "stream"}, result.stderr[-3000:]
    assert all(entry["method"] == "grpc-stream" for entry in stats.values())
    # 2 users for about 5 s, streams of 1.5 s (46 chunks) with 0.5-1.5 s waits:
    # each user finishes one to three streams.
    assert 2 <= stats["stream"]["num_requests"] <= 8
    assert stats["stream"]["num_failures"] == 0
    assert stats["time to first result"]["num_requests"] >= stats["stream"]["num_requests"]
    assert 46 * 2 <= stats["chunk"]["num_requests"] <= 46 * 10
    assert stats["chunk"]["num_failures"] == 0
    assert 0 < stats["chunk"]["min_response_time"] <= stats["chunk"]["max_response_time"] < 5000
    assert stats["chunk"]["total_content_length"] == stats["chunk"]["num_requests"] * 3072
