"""The streaminfer-client command and its text and JSON output."""

from __future__ import annotations

import io
import json
import pathlib
import socket
import subprocess
import sys

import grpc
import pytest
from client_fakes import FakeServer, write_wav

from streaminfer.client import ChunkFailed, ChunksAcked, Modality, Result, StreamEnded, StreamRolledOver
from streaminfer.client._output import event_json, format_event, summary_json, summary_lines
from streaminfer.client._tracker import ChunkTracker
from streaminfer.client.cli import build_parser, main, plan_stream
from streaminfer.v1 import streaminfer_pb2 as pb


def _result(model: str, modality: int, first: int, last: int) -> pb.StreamResult:
    return pb.StreamResult(
        model=model, modality=modality, first_sequence_number=first, last_sequence_number=last, is_final=True
    )


def _speech(event_type: int, start: float, end: float, probability: float) -> Result:
    result = _result("silero_vad", pb.MODALITY_AUDIO, 14, 14)
    result.start_time.FromNanoseconds(round(start * 1e9))
    result.end_time.FromNanoseconds(round(end * 1e9))
    result.speech.event_type = event_type
    result.speech.speech_probability = probability
    return Result(result)


def test_format_speech_events() -> None:
    start = _speech(pb.SPEECH_EVENT_TYPE_SPEECH_START, 0.42, 0.45, 0.93)
    end = _speech(pb.SPEECH_EVENT_TYPE_SPEECH_END, 0.42, 1.3, 0.88)

    assert format_event(start) == "[audio 0.42s] silero_vad speech start p=0.93"
    assert format_event(end) == "[audio 0.42s] silero_vad speech end 0.42-1.30s p=0.88"


def test_format_interim_activity() -> None:
    event = _speech(pb.SPEECH_EVENT_TYPE_ACTIVITY, 0.0, 0.032, 0.1)
    event.proto.is_final = False

    assert format_event(event) == "[audio 0.00s] silero_vad activity p=0.10 (interim)"


def test_format_detections() -> None:
    result = _result("hog_people", pb.MODALITY_VIDEO, 12, 12)
    for _ in range(3):
        result.detections.detections.add(label="person", score=1.5)
    empty = _result("haar_faces", pb.MODALITY_VIDEO, 12, 12)
    empty.detections.SetInParent()

    assert format_event(Result(result)) == "[video frame 12] hog_people 3 person(s)"
    assert format_event(Result(empty)) == "[video frame 12] haar_faces 0 detections"


def test_format_embedding_excerpt() -> None:
    result = _result("minilm_embedding", pb.MODALITY_TEXT, 2, 3)
    result.embedding.values.extend([0.0] * 384)
    result.embedding.text = (
        "The GNU General Public License is a free,\n copyleft license for software and other kinds of works."
    )

    line = format_event(Result(result))

    assert line == '[text #2-3] minilm_embedding 384-d "The GNU General Public License is a free, copyleft licens..."'


def test_format_chunk_error_and_silent_events() -> None:
    chunk_error = pb.ChunkError(
        modality=pb.MODALITY_VIDEO,
        sequence_number=7,
        reason=pb.CHUNK_ERROR_REASON_DEADLINE,
        message="queued 2.1 s, over the 2 s deadline",
        model="hog_people",
    )
    error = ChunkFailed(chunk_error, 2.1)
    ack_proto = pb.ChunkAck(modality=pb.MODALITY_AUDIO, first_sequence_number=1, last_sequence_number=1)
    ack = ChunksAcked(ack_proto, ((1, 0.01),))

    expected = "[video frame 7] chunk failed: DEADLINE (hog_people): queued 2.1 s, over the 2 s deadline"
    assert format_event(error) == expected
    assert format_event(ack) is None
    assert format_event(StreamEnded(pb.StreamEnd())) is None


def test_event_json_lines() -> None:
    ack_proto = pb.ChunkAck(modality=pb.MODALITY_AUDIO, first_sequence_number=1, last_sequence_number=2)
    ack = ChunksAcked(ack_proto, ((1, 0.0125), (2, 0.002)))
    error_proto = pb.ChunkError(modality=pb.MODALITY_TEXT, sequence_number=3, reason=pb.CHUNK_ERROR_REASON_TOO_LARGE)
    error = ChunkFailed(error_proto, None)
    result = _speech(pb.SPEECH_EVENT_TYPE_SPEECH_START, 0.5, 0.5, 0.75)

    ack_data = json.loads(event_json(ack))
    error_data = json.loads(event_json(error))
    result_data = json.loads(event_json(result))

    assert "\n" not in event_json(result)
    assert ack_data == {
        "event": "ack",
        "ack": {"modality": "MODALITY_AUDIO", "firstSequenceNumber": "1", "lastSequenceNumber": "2"},
        "latencyMs": {"1": 12.5, "2": 2.0},
    }
    assert error_data["event"] == "chunkError"
    assert error_data["error"]["reason"] == "CHUNK_ERROR_REASON_TOO_LARGE"
    assert error_data["latencyMs"] is None
    assert result_data["event"] == "result"
    assert result_data["result"]["speech"] == {"eventType": "SPEECH_EVENT_TYPE_SPEECH_START", "speechProbability": 0.75}
    assert result_data["result"]["startTime"] == "0.500s"


def _stats_fixture() -> ChunkTracker:
    tracker = ChunkTracker(max_in_flight=0)
    for index in range(4):
        number = tracker.reserve(Modality.AUDIO)
        tracker.mark_sent(Modality.AUDIO, number, float(index))
        tracker.ack(Modality.AUDIO, number, number, index + 0.010 * (index + 1))
    number = tracker.reserve(Modality.VIDEO)
    tracker.mark_sent(Modality.VIDEO, number, 0.0)
    tracker.fail(Modality.VIDEO, number, "DEADLINE", 0.5)
    tracker.stats.results_by_model.update({"silero_vad": 2, "hog_people": 0})
    return tracker


def test_summary_lines() -> None:
    stats = _stats_fixture().stats
    end = pb.StreamEnd(totals=[pb.ModalityTotals(modality=pb.MODALITY_AUDIO, chunks_received=4, chunks_acked=4)])

    lines = summary_lines("s-1", stats, end)

    assert lines[0] == "summary of stream s-1:"
    assert lines[1] == "  audio  sent 4, acked 4, failed 0; latency p50 20.0 ms, p99 40.0 ms per chunk"
    assert lines[2] == "  video  sent 1, acked 0, failed 1 (DEADLINE 1); latency p50 500.0 ms, p99 500.0 ms per chunk"
    assert lines[3].startswith("  all    latency p50 ")
    assert "silero_vad 2" in lines[4]
    assert not any("server counted differently" in line for line in lines)


def test_summary_reports_server_mismatch() -> None:
    stats = _stats_fixture().stats
    end = pb.StreamEnd(totals=[pb.ModalityTotals(modality=pb.MODALITY_AUDIO, chunks_received=5, chunks_acked=4)])

    lines = summary_lines("s-1", stats, end)

    assert lines[-1] == "  server counted differently: audio received 5, acked 4, failed 0"


def test_summary_json() -> None:
    data = json.loads(summary_json("s-1", _stats_fixture().stats))

    assert data["event"] == "summary"
    assert data["modalities"]["audio"]["acked"] == 4
    assert data["modalities"]["audio"]["latencyP50Ms"] == 20.0
    assert data["modalities"]["video"]["failuresByReason"] == {"DEADLINE": 1}


@pytest.mark.parametrize("argv", [["--help"], ["stream", "--help"], ["models", "--help"], ["infer", "--help"]])
def test_cli_help_runs(argv: list[str]) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "streaminfer.client.cli", *argv], capture_output=True, text=True, timeout=60
    )

    assert completed.returncode == 0, completed.stderr
    assert "usage: streaminfer-client" in completed.stdout


def test_stream_help_states_units_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["stream", "--help"])

    text = " ".join(capsys.readouterr().out.split())
    assert exited.value.code == 0
    assert "milliseconds (default 32)" in text
    assert "default 127.0.0.1:50051" in text
    assert "0 is as fast as the in-flight window allows (default 1)" in text
    assert "silero_vad for audio, hog_people and haar_faces for video, minilm_embedding for text" in text
    assert "stop each medium after this many seconds of media time" in text
    assert "(default: no limit)" in text


def test_stream_help_scheduling_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["stream", "--help"])

    text = " ".join(capsys.readouterr().out.split())
    assert "--priority {interactive,bulk}" in text
    assert "(default: interactive, the server's default)" in text
    assert "--chunk-budget-ms MS milliseconds after the server reads a chunk" in text
    assert "(default: the server's budget, limits.chunk_latency_budget_ms in its config, 5000 unless changed)" in text
    assert "--video-overflow {keep-latest,backpressure}" in text
    assert "(default: keep-latest, the server's default)" in text


def test_infer_help_description(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["infer", "--help"])

    usage, description = capsys.readouterr().out.split("\n\n")[:2]
    assert usage.startswith("usage: streaminfer-client infer")
    assert description.startswith("Run one model on one input (text, a text file, a WAV file or an image)")


def test_scheduling_options_reach_config(tmp_path: pathlib.Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("One line.\n", encoding="utf-8")

    args = build_parser().parse_args(
        [
            "stream", "--text", str(text), "--priority", "bulk", "--chunk-budget-ms", "250",
            "--video-overflow", "backpressure",
        ]
    )
    config = plan_stream(args).config
    defaults = plan_stream(build_parser().parse_args(["stream", "--text", str(text)])).config

    assert config.priority == pb.PRIORITY_BULK
    assert config.chunk_latency_budget.ToNanoseconds() == 250_000_000
    assert config.video_overflow_policy == pb.OVERFLOW_POLICY_BACKPRESSURE
    assert plan_stream(build_parser().parse_args(
        ["stream", "--text", str(text), "--priority", "interactive", "--video-overflow", "keep-latest"]
    )).config.video_overflow_policy == pb.OVERFLOW_POLICY_KEEP_LATEST
    assert defaults.priority == pb.PRIORITY_UNSPECIFIED
    assert not defaults.HasField("chunk_latency_budget")
    assert defaults.video_overflow_policy == pb.OVERFLOW_POLICY_UNSPECIFIED


@pytest.mark.parametrize("argv", [["--priority", "urgent"], ["--chunk-budget-ms", "0"], ["--video-overflow", "drop"]])
def test_scheduling_options_reject_bad_values(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["stream", "--text", "notes.txt", *argv])

    assert exited.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_cli_audio_chunk_over_limit(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    wav = tmp_path / "speech.wav"
    # 2 s of 48 kHz stereo: one 2000 ms chunk has 384000 bytes, over the fake server's 262144.
    write_wav(wav, rate=48000, channels=2, frames=96000)

    with FakeServer(window=4) as server:
        status = main(
            ["stream", "--target", server.target, "--audio", str(wav), "--chunk-ms", "2000", "--speed", "0"],
            out=io.StringIO(),
        )

    error = capsys.readouterr().err
    assert status == 2
    assert "--chunk-ms 2000 is too long for this server: audio chunk of 384000 bytes is over the stream's " \
        "max_audio_chunk_bytes of 262144 bytes" in error
    assert server.service.stream_requests == []


def test_cli_nothing_to_stream(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stream"]) == 2
    assert "give at least one of --audio, --video or --text" in capsys.readouterr().err


def test_cli_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    assert main(["stream", "--audio", str(tmp_path / "absent.wav")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "absent.wav" in error


def test_cli_rpc_failure_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    assert main(["models", "--target", f"127.0.0.1:{port}"]) == 1

    error = capsys.readouterr().err
    assert error.startswith("streaminfer-client: error: UNAVAILABLE: ")
    assert error.count("\n") == 1


def test_cli_stream_json_against_fake(tmp_path: pathlib.Path) -> None:
    wav = tmp_path / "speech.wav"
    write_wav(wav, rate=16000, channels=1, frames=16000)
    text = tmp_path / "notes.txt"
    text.write_text("First line.\nbad line\nLast line.\n", encoding="utf-8")
    out = io.StringIO()

    with FakeServer(window=4) as server:
        status = main(
            ["stream", "--target", server.target, "--audio", str(wav), "--text", str(text), "--speed", "0", "--json"],
            out=out,
        )

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    # One text chunk failed on the fake server, which exit status 3 reports.
    assert status == 3
    assert lines[0]["event"] == "sessionAccepted"
    assert lines[-1]["event"] == "summary"
    assert lines[-2]["event"] == "streamEnd"
    summary = lines[-1]
    assert summary["modalities"]["audio"] == {**summary["modalities"]["audio"], "sent": 32, "acked": 32, "failed": 0}
    assert summary["modalities"]["text"]["failed"] == 1
    config = server.service.stream_requests
    assert config, "the fake server saw no chunks"


def test_cli_stream_text_output_against_fake(tmp_path: pathlib.Path) -> None:
    wav = tmp_path / "speech.wav"
    write_wav(wav, rate=48000, channels=2, frames=4800)
    out = io.StringIO()

    with FakeServer(window=4) as server:
        status = main(["stream", "--target", server.target, "--audio", str(wav), "--speed", "0"], out=out)

    lines = out.getvalue().splitlines()
    assert status == 0
    assert lines[0] == "[audio #1] silero_vad activity p=0.25"
    assert "summary of stream grpc-fake:" in lines
    assert any(line.startswith("  audio  sent 4, acked 4, failed 0; latency p50 ") for line in lines)
    # One medium ends with the stream, so end of input finishes its work and no flush is sent.
    assert _controls(server) == []


def _controls(server: FakeServer) -> list[pb.StreamControl]:
    return [request.control for request in server.service.stream_requests if request.HasField("control")]


def _wire_order(server: FakeServer) -> list[str]:
    """Return the kind of each request the server read, with the modality of controls, for example "control:audio"."""
    kinds = []
    for request in server.service.stream_requests:
        kind = request.WhichOneof("request")
        if kind == "control":
            kind = f"control:{Modality(request.control.modality).label}"
        kinds.append(kind)
    return kinds


def test_cli_flushes_medium_that_ends_first(tmp_path: pathlib.Path) -> None:
    wav = tmp_path / "speech.wav"
    write_wav(wav, rate=16000, channels=1, frames=16000)
    text = tmp_path / "notes.txt"
    # At 60 words per minute and speed 4 the lines are due 0, 0.5 and 1 s after the start,
    # and the 1 s of audio has all been sent after 0.25 s.
    text.write_text("First line.\nSecond line.\nThird line.\n", encoding="utf-8")
    out = io.StringIO()

    with FakeServer(window=4) as server:
        status = main(
            [
                "stream", "--target", server.target, "--audio", str(wav), "--text", str(text),
                "--text-wpm", "60", "--speed", "4",
            ],
            out=out,
        )

    order = _wire_order(server)
    assert status == 0
    assert [control.action for control in _controls(server)] == [pb.CONTROL_ACTION_FLUSH]
    assert order.count("control:audio") == 1
    flush_at = order.index("control:audio")
    assert "audio" not in order[flush_at:], "audio was sent after its flush"
    assert "text" in order[flush_at:], "the flush came after the text had ended too"


def test_cli_max_seconds_limits_each_medium(tmp_path: pathlib.Path) -> None:
    wav = tmp_path / "speech.wav"
    write_wav(wav, rate=16000, channels=1, frames=5 * 16000)
    text = tmp_path / "notes.txt"
    # At 60 words per minute the lines are due at 0, 2, 4, 6 and 8 s of the pacing clock.
    text.write_text("one two\n" * 5, encoding="utf-8")
    out = io.StringIO()

    with FakeServer(window=4) as server:
        status = main(
            [
                "stream", "--target", server.target, "--audio", str(wav), "--text", str(text),
                "--text-wpm", "60", "--max-seconds", "3", "--speed", "0", "--json",
            ],
            out=out,
        )

    requests = server.service.stream_requests
    audio_bytes = sum(len(request.audio.audio_content) for request in requests if request.HasField("audio"))
    text_chunks = [request.text.text for request in requests if request.HasField("text")]
    summary = json.loads(out.getvalue().splitlines()[-1])
    assert status == 0
    assert audio_bytes == 3 * 16000 * 2
    assert text_chunks == [b"one two\n", b"one two\n"]
    assert summary["modalities"]["audio"]["sent"] == 94
    assert summary["modalities"]["text"]["sent"] == 2


@pytest.mark.parametrize("value", ["0", "-2", "soon", "inf", "nan"])
def test_cli_max_seconds_rejects_bad_value(capsys: pytest.CaptureFixture[str], value: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["stream", "--text", "notes.txt", "--max-seconds", value])

    assert exited.value.code == 2
    assert f"argument --max-seconds: {value!r} is invalid: expected a number > 0" in capsys.readouterr().err


def test_cli_models_and_infer_against_fake(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeServer() as server:
        assert main(["models", "--target", server.target]) == 0
        models_out = capsys.readouterr().out
        assert main(["models", "nope", "--target", server.target]) == 1
        not_found = capsys.readouterr().err
        assert main(["infer", "--target", server.target, "--model", "minilm_embedding", "--text", "Hi."]) == 0
        infer_out = capsys.readouterr().out

    assert models_out.splitlines()[0].startswith("silero_vad           audio  cpu")
    assert not_found.startswith("streaminfer-client: error: NOT_FOUND: model 'nope' not found")
    assert infer_out == '[infer] minilm_embedding 4-d "Hi."\n'


def test_target_gets_default_port() -> None:
    from streaminfer.client._client import with_default_port

    assert with_default_port("localhost") == "localhost:50051"
    assert with_default_port("10.1.2.3:7000") == "10.1.2.3:7000"
    assert with_default_port("::1") == "[::1]:50051"
    assert with_default_port("[::1]") == "[::1]:50051"
    assert with_default_port("[::1]:9000") == "[::1]:9000"
    assert with_default_port("unix:/tmp/socket") == "unix:/tmp/socket"


def test_float_wav_error_says_what_to_do(tmp_path, capsys) -> None:
    import struct

    path = tmp_path / "float.wav"
    samples = struct.pack("<4f", 0.0, 0.1, -0.1, 0.0)
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(samples)) + samples
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)

    status = main(["stream", "--audio", str(path)], out=io.StringIO())

    assert status == 2
    error = capsys.readouterr().err
    assert "32-bit float samples are not supported" in error
    assert "sox" in error


def test_connection_help_states_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["models", "--help"])

    text = " ".join(capsys.readouterr().out.split())
    assert "x-api-key metadata of every call (default: the STREAMINFER_API_KEY environment variable" in text
    assert "(default: plaintext)" in text
    assert "starts at 0.2 s and doubles up to 10 s" in text
    assert "0 turns retries off (default 4)" in text


def test_cli_api_key_from_option_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeServer() as server:
        assert main(["models", "--target", server.target, "--api-key", "from-option"], out=io.StringIO()) == 0
        monkeypatch.setenv("STREAMINFER_API_KEY", "from-environment")
        assert main(["models", "--target", server.target], out=io.StringIO()) == 0
        assert main(["models", "--target", server.target, "--api-key", "override"], out=io.StringIO()) == 0
        monkeypatch.delenv("STREAMINFER_API_KEY")
        assert main(["models", "--target", server.target], out=io.StringIO()) == 0

    keys = [metadata.get("x-api-key") for metadata in server.service.metadata["ListModels"]]
    assert keys == ["from-option", "from-environment", "override", None]


def test_cli_unauthenticated_hint_per_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("STREAMINFER_API_KEY", raising=False)
    hints = []
    with FakeServer() as server:
        for argv, environment in (([], None), (["--api-key", "wrong"], None), ([], "wrong-from-environment")):
            if environment is not None:
                monkeypatch.setenv("STREAMINFER_API_KEY", environment)
            server.service.reject("ListModels", grpc.StatusCode.UNAUTHENTICATED)
            assert main(["models", "--target", server.target, "--retries", "0", *argv], out=io.StringIO()) == 1
            [hint] = [line for line in capsys.readouterr().err.splitlines() if "hint:" in line]
            hints.append(hint.removeprefix("streaminfer-client: hint: "))

    assert hints == [
        "pass the key with --api-key or the STREAMINFER_API_KEY environment variable",
        "check the API key from --api-key: the server does not accept it",
        "check the API key from the STREAMINFER_API_KEY environment variable: the server does not accept it",
    ]


def test_cli_retries_option() -> None:
    with FakeServer() as server:
        server.service.reject("ListModels", grpc.StatusCode.UNAVAILABLE, pushback="0")
        assert main(["models", "--target", server.target], out=io.StringIO()) == 0
        server.service.reject("ListModels", grpc.StatusCode.UNAVAILABLE, pushback="0")
        assert main(["models", "--target", server.target, "--retries", "0"], out=io.StringIO()) == 1

    assert len(server.service.metadata["ListModels"]) == 3


def test_cli_rejects_half_client_certificate(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    certificate = tmp_path / "client.pem"
    certificate.write_text("-----BEGIN CERTIFICATE-----\n", encoding="ascii")

    assert main(["models", "--cert-file", str(certificate)]) == 2

    error = capsys.readouterr().err
    assert "--cert-file and --key-file go together" in error


def test_cli_names_unreadable_ca_file(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    path = tmp_path / "my_ca_file.pem"

    assert main(["models", "--ca-file", str(path)]) == 2

    error = capsys.readouterr().err
    assert f"--ca-file {str(path)!r} could not be read" in error


def test_cli_rejects_padded_api_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--api-key", " key"]) == 2

    assert "--api-key (or STREAMINFER_API_KEY) is invalid" in capsys.readouterr().err


def test_cli_stream_roll_over(tmp_path: pathlib.Path) -> None:
    wav = tmp_path / "speech.wav"
    # 10 chunks of 32 ms.
    write_wav(wav, rate=16000, channels=1, frames=5120)
    out = io.StringIO()

    with FakeServer(window=4) as server:
        server.service.end_streams_after_chunks = 4
        status = main(
            ["stream", "--target", server.target, "--audio", str(wav), "--speed", "0", "--roll-over", "--json"],
            out=out,
        )

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    rollovers = [line for line in lines if line["event"] == "rolledOver"]
    summary = lines[-1]
    assert status == 0
    assert server.service.streams_ended_by_server == 2
    assert len(rollovers) == 2
    assert rollovers[0]["previousEnd"]["reason"] == "STREAM_END_REASON_MAX_DURATION"
    assert summary["rollovers"] == 2
    assert summary["modalities"]["audio"]["sent"] == 10
    assert summary["modalities"]["audio"]["acked"] == 10
    assert summary["modalities"]["audio"]["failed"] == 0


def test_cli_stream_without_roll_over_fails(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    wav = tmp_path / "speech.wav"
    write_wav(wav, rate=16000, channels=1, frames=5120)
    out = io.StringIO()

    with FakeServer(window=4) as server:
        server.service.end_streams_after_chunks = 4
        status = main(["stream", "--target", server.target, "--audio", str(wav), "--speed", "0"], out=out)

    assert status == 1
    assert "DEADLINE_EXCEEDED: the stream reached its maximum duration" in capsys.readouterr().err
    assert "  the server ended the stream: MAX_DURATION" in out.getvalue().splitlines()


def test_format_roll_over_event() -> None:
    accepted = pb.SessionAccepted(stream_id="s-2")
    end = pb.StreamEnd(reason=pb.STREAM_END_REASON_DRAINING)
    event = StreamRolledOver(end, "s-1", accepted, ((Modality.AUDIO, 7), (Modality.TEXT, 2)))

    data = json.loads(event_json(event))

    assert format_event(event) == "[stream] stream s-1 ended (DRAINING); continuing as stream s-2, 2 chunk(s) resent"
    assert data == {
        "event": "rolledOver",
        "previousEnd": {"reason": "STREAM_END_REASON_DRAINING"},
        "previousStreamId": "s-1",
        "streamId": "s-2",
        "resent": [{"modality": "audio", "sequenceNumber": 7}, {"modality": "text", "sequenceNumber": 2}],
    }


def test_chunk_error_json_marks_client_reports() -> None:
    proto = pb.ChunkError(modality=pb.MODALITY_AUDIO, sequence_number=4, reason=pb.CHUNK_ERROR_REASON_SHUTDOWN)

    assert json.loads(event_json(ChunkFailed(proto, 0.5, from_client=True)))["fromClient"] is True
    assert json.loads(event_json(ChunkFailed(proto, 0.5)))["fromClient"] is False


def test_summary_after_roll_over() -> None:
    stats = _stats_fixture().stats
    stats.rollovers = 2
    stats.modality(Modality.AUDIO).resent = 3
    end = pb.StreamEnd(totals=[pb.ModalityTotals(modality=pb.MODALITY_AUDIO, chunks_received=1, chunks_acked=1)])

    lines = summary_lines("s-3", stats, end)

    assert "  rolled over to a new stream 2 time(s), 3 chunk(s) resent" in lines
    # The last StreamEnd counts only the last stream, so it is not compared.
    assert not any("server counted differently" in line for line in lines)
