"""streaminfer-loadtest: schedules, latency from scheduled time, histogram merging, and runs against a real server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
import re
from collections.abc import Iterator

import pytest

from streaminfer.loadtest import cli
from streaminfer.loadtest.runner import ChunkBook, LoadConfig, create_clients, plan_streams, send_paced
from streaminfer.loadtest.schedule import parse_ramp, poisson_arrivals
from streaminfer.loadtest.stats import Recorder, percentiles_ms
from streaminfer.server.config import AuthConfig

from certificates import make_certificates
from conftest import MEDIA, ServerThread, loopback_config

API_KEY = "loadtest-key-5e1b"


def running_vad_server(**changes: object) -> Iterator[ServerThread]:
    """Run a loopback server of silero_vad alone, with ``changes`` to its config, until the fixture ends."""
    config = loopback_config()
    config = dataclasses.replace(config, models=tuple(m for m in config.models if m.name == "silero_vad"), **changes)
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def vad_server() -> Iterator[ServerThread]:
    yield from running_vad_server()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A test CA (ca.pem) and a server certificate for 127.0.0.1 it signed (server.pem, server.key)."""
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secured_vad_server(certificates: pathlib.Path) -> Iterator[ServerThread]:
    """A VAD server that speaks TLS only and accepts one API key."""
    yield from running_vad_server(
        auth=AuthConfig(api_keys=(API_KEY,)),
        tls_cert_file=str(certificates / "server.pem"),
        tls_key_file=str(certificates / "server.key"),
    )


@pytest.fixture(scope="module")
def client_certificate_server(certificates: pathlib.Path) -> Iterator[ServerThread]:
    """A VAD server that speaks TLS only and requires client certificates signed by the test CA."""
    yield from running_vad_server(
        tls_cert_file=str(certificates / "server.pem"),
        tls_key_file=str(certificates / "server.key"),
        tls_client_ca_file=str(certificates / "ca.pem"),
    )


# Schedules


def test_open_loop_schedule_is_deterministic_for_a_seed() -> None:
    first = poisson_arrivals(20.0, 30.0, seed=42, max_arrivals=10_000)
    again = poisson_arrivals(20.0, 30.0, seed=42, max_arrivals=10_000)
    other = poisson_arrivals(20.0, 30.0, seed=43, max_arrivals=10_000)
    assert first == again
    assert first != other
    assert all(0 <= a < b < 30.0 for a, b in zip(first, first[1:]))


def test_open_loop_mean_rate() -> None:
    rate, duration = 50.0, 400.0
    arrivals = poisson_arrivals(rate, duration, seed=7, max_arrivals=1_000_000)
    # About 20 000 arrivals: the count's standard deviation is about 0.7 %.
    assert len(arrivals) / duration == pytest.approx(rate, rel=0.03)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / rate, rel=0.03)


def test_open_loop_schedule_stops_at_the_arrival_cap() -> None:
    assert len(poisson_arrivals(1000.0, 60.0, seed=1, max_arrivals=25)) == 25


def test_planned_streams_follow_the_arrivals() -> None:
    config = LoadConfig(arrival_rate=5.0, duration_s=20.0, stream_s=3.0, seed=9)
    plans = plan_streams(config)
    assert [p.start_s for p in plans] == poisson_arrivals(5.0, 20.0, seed=9, max_arrivals=10_000)
    assert all(p.length_s <= 3.0 and p.start_s + p.length_s <= 20.0 + 1e-9 for p in plans)


def test_ramp_parsing() -> None:
    ramp = parse_ramp("10:5:2.5:30")
    assert (ramp.start, ramp.step, ramp.every_s, ramp.maximum) == (10, 5, 2.5, 30)
    assert ramp.levels() == [10, 15, 20, 25, 30]
    with pytest.raises(ValueError):
        parse_ramp("10:5:30")
    with pytest.raises(ValueError):
        parse_ramp("10:0:1:30")


# Latency counts from each chunk's scheduled send time


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class StallingSession:
    """Sends nothing; the write of chunk ``stall_at`` takes ``stall_s`` seconds of the fake clock."""

    def __init__(self, clock: FakeClock, stall_at: int, stall_s: float) -> None:
        self.clock = clock
        self.stall_at = stall_at
        self.stall_s = stall_s
        self.sent: list[tuple[int, float]] = []
        self.ended = False

    async def send_audio(self, content: bytes, timestamp: float | None = None) -> int:
        number = len(self.sent) + 1
        if number == self.stall_at:
            self.clock.now += self.stall_s
        self.sent.append((number, self.clock.now))
        return number

    send_frame = send_text = send_audio

    async def end_input(self) -> None:
        self.ended = True


def _run_sender(clock: FakeClock, session: StallingSession, start: float, chunks: int) -> ChunkBook:
    recorder = Recorder(budget_ms=100.0)
    book = ChunkBook(recorder, "audio", t0=start, level_of=lambda when: None)
    interval = 0.1
    asyncio.run(
        send_paced(session, book, lambda k: (b"\0\0" * 160, interval), start, start + chunks * interval - 1e-9, clock)
    )
    return book


def test_sender_late_start_counts_in_latency() -> None:
    # Chunks are due at 100.0, 100.1, 100.2; the sender only gets going at 100.5.
    clock = FakeClock(100.5)
    session = StallingSession(clock, stall_at=0, stall_s=0.0)
    book = _run_sender(clock, session, start=100.0, chunks=3)
    assert session.ended and len(session.sent) == 3
    # The server acks all three at once, 10 ms after they were written.
    clock.now = 100.51
    book.acked(1, 3, clock.now)
    latency = book.recorder.latency
    assert latency.get_total_count() == 3
    assert latency.get_min_value() == pytest.approx(310_000, rel=0.01)  # 100.51 - 100.2
    assert latency.get_max_value() == pytest.approx(510_000, rel=0.01)  # 100.51 - 100.0
    assert book.recorder.send_lateness.get_max_value() == pytest.approx(500_000, rel=0.01)
    assert book.recorder.counters["chunks_over_budget"] == 3


def test_sender_stalled_write_counts_in_latency() -> None:
    clock = FakeClock(200.0)
    # The second write blocks for 2 s, as with a full window. The acks then come at once.
    session = StallingSession(clock, stall_at=2, stall_s=2.0)
    book = _run_sender(clock, session, start=200.0, chunks=4)
    assert [n for n, _ in session.sent] == [1, 2, 3, 4]
    now = clock.now
    book.acked(1, 4, now)
    # Chunk 4 was due at 200.3 and acked at 202.0 or later: at least 1.7 s, not the few ms after its write.
    assert book.recorder.latency.get_max_value() >= 2_000_000 * 0.99
    assert book.recorder.latency.get_value_at_percentile(25) >= 1_700_000 * 0.99
    assert not book.scheduled


def test_errors_and_unanswered_chunks_are_counted_apart() -> None:
    recorder = Recorder()
    book = ChunkBook(recorder, "audio", t0=0.0, level_of=lambda when: None)
    book.scheduled.update({1: 0.0, 2: 0.1, 3: 0.2, 4: 0.3})
    book.acked(1, 1, 0.05)
    book.failed(2, "DEADLINE", from_client=False)
    book.failed(3, "SHUTDOWN", from_client=True)
    book.abandon()
    assert recorder.counters["chunks_acked"] == 1
    assert recorder.counters["chunk_errors"] == 1
    assert recorder.counters["chunks_unanswered"] == 2
    assert dict(recorder.drop_reasons) == {"DEADLINE": 1, "UNANSWERED": 2}


def test_warmup_chunks_not_judged() -> None:
    recorder = Recorder(budget_ms=100.0)
    # The stream starts at 10.0 with 1 s of warm-up.
    book = ChunkBook(recorder, "audio", t0=0.0, level_of=lambda when: None, judged_from=11.0)
    book.scheduled.update({1: 10.0, 2: 10.5, 3: 11.0, 4: 11.5})
    # The first two chunks are late (300 ms and 200 ms), the later ones on time.
    book.acked(1, 2, 10.7)
    book.acked(3, 3, 11.05)
    book.acked(4, 4, 11.56)
    assert book.max_latency_s == pytest.approx(0.06)
    assert recorder.latency.get_total_count() == 4
    assert recorder.counters["chunks_over_budget"] == 2


def test_warmup_option_checked() -> None:
    args = cli.build_parser().parse_args(["--warmup", "1.5"])
    assert cli.config_from_args(args).warmup_s == 1.5
    with pytest.raises(ValueError, match=r"--warmup -1\.0 is invalid: expected seconds >= 0"):
        cli.config_from_args(cli.build_parser().parse_args(["--warmup", "-1"]))


def test_help_states_each_default_once() -> None:
    parser = cli.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = (formatter._get_help_string(action) or "").replace("%(default)s", "")
        assert text.count("(default") <= 1, f"{action.option_strings}: {text}"
    help_text = " ".join(parser.format_help().split())
    assert "(default: 0, every chunk)" in help_text
    assert "(default: 0.0)" not in help_text
    assert help_text.count("default 4") == 1
    assert "(default 4 when no shape is given)" in help_text


# Connection options


def test_connection_defaults_plaintext_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMINFER_API_KEY", raising=False)
    config = cli.config_from_args(cli.build_parser().parse_args([]))

    assert config.api_key is None
    assert config.tls is False
    assert config.ca_file is None
    [client, *_] = create_clients(config)
    assert client._credentials is None
    assert client._metadata is None


def test_api_key_from_option_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMINFER_API_KEY", "from-environment")
    parser = cli.build_parser()

    assert cli.config_from_args(parser.parse_args([])).api_key == "from-environment"
    assert cli.config_from_args(parser.parse_args(["--api-key", "from-option"])).api_key == "from-option"
    # The key is not shown as the option's default in --help.
    assert "from-environment" not in parser.format_help()
    config = cli.config_from_args(parser.parse_args(["--connections", "2"]))
    clients = create_clients(config)
    assert len(clients) == 2
    assert all(dict(client._metadata)["x-api-key"] == "from-environment" for client in clients)


def test_padded_api_key_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMINFER_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"--api-key \(or STREAMINFER_API_KEY\) is invalid"):
        cli.config_from_args(cli.build_parser().parse_args(["--api-key", "key "]))


def test_tls_options_build_credentials(certificates: pathlib.Path) -> None:
    parser = cli.build_parser()
    with_ca = cli.config_from_args(parser.parse_args(["--ca-file", str(certificates / "ca.pem")]))
    default_roots = cli.config_from_args(parser.parse_args(["--tls"]))

    # --ca-file implies --tls.
    assert with_ca.tls is True
    assert with_ca.ca_file == str(certificates / "ca.pem")
    assert default_roots.tls is True
    assert default_roots.ca_file is None
    assert all(client._credentials is not None for client in create_clients(with_ca) + create_clients(default_roots))


def test_client_certificate_needs_key_file(certificates: pathlib.Path) -> None:
    arguments = ["--cert-file", str(certificates / "client.pem")]
    with pytest.raises(ValueError, match=r"--cert-file and --key-file go together"):
        cli.config_from_args(cli.build_parser().parse_args(arguments))


def test_unreadable_ca_file_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "absent.pem"
    with pytest.raises(ValueError, match=r"--ca-file '.*absent.pem' could not be read"):
        cli.config_from_args(cli.build_parser().parse_args(["--ca-file", str(path)]))


def test_connection_hints() -> None:
    plaintext = LoadConfig()
    closed = {"UNAVAILABLE": "failed to connect to all addresses; last error: UNAVAILABLE: 127.0.0.1:1: Socket closed"}

    assert "add --tls" in cli.connection_hint(closed, plaintext)
    assert cli.connection_hint(closed, LoadConfig(tls=True)) == ""
    assert "pass the key with --api-key" in cli.connection_hint({"UNAUTHENTICATED": "requires a key"}, plaintext)
    assert "check the API key" in cli.connection_hint({"UNAUTHENTICATED": "not accepted"}, LoadConfig(api_key="k"))
    assert cli.connection_hint({"OK": ""}, plaintext) == ""


# Histograms merged across processes


def test_merged_histograms_keep_every_count() -> None:
    a, b, together = Recorder(), Recorder(), Recorder()
    for i in range(1, 1001):
        a.record_latency("audio", i / 1000.0, second_index=i % 5)
        together.record_latency("audio", i / 1000.0, second_index=i % 5)
    for i in range(1, 501):
        b.record_latency("video", i / 100.0, second_index=i % 7)
        together.record_latency("video", i / 100.0, second_index=i % 7)
    a.count("chunks_sent", 1000)
    b.count("chunks_sent", 500)
    b.drop_reasons["OVERFLOW"] += 3
    merged = Recorder()
    # Through the same encoding the worker processes use.
    merged.merge(Recorder.from_wire(json.loads(json.dumps(a.to_wire()))))
    merged.merge(Recorder.from_wire(json.loads(json.dumps(b.to_wire()))))
    assert merged.latency.get_total_count() == 1500
    assert merged.counters["chunks_sent"] == 1500
    assert merged.drop_reasons["OVERFLOW"] == 3
    assert percentiles_ms(merged.latency) == percentiles_ms(together.latency)
    assert {k: v.get_total_count() for k, v in merged.latency_by_second.items()} == {
        k: v.get_total_count() for k, v in together.latency_by_second.items()
    }
    assert merged.latency_by_modality["audio"].get_total_count() == 1000
    assert merged.latency_by_modality["video"].get_total_count() == 500
    # An empty recorder survives the trip too.
    assert Recorder.from_wire(Recorder().to_wire()).latency.get_total_count() == 0


def test_first_message_kept_per_status() -> None:
    from streaminfer.loadtest.report import build_report, format_summary

    a, b = Recorder(), Recorder()
    a.count_status("OK")
    a.count_status("UNAVAILABLE", "the server is near its limit; retry after 1000 ms")
    a.count_status("UNAVAILABLE", "a later message")
    b.count_status("UNAVAILABLE", "from another process")
    b.count_status("DEADLINE_EXCEEDED", "deadline passed")
    merged = Recorder()
    merged.merge(Recorder.from_wire(json.loads(json.dumps(a.to_wire()))))
    merged.merge(Recorder.from_wire(json.loads(json.dumps(b.to_wire()))))
    assert merged.status_codes == {"OK": 1, "UNAVAILABLE": 3, "DEADLINE_EXCEEDED": 1}
    assert merged.status_messages == {
        "UNAVAILABLE": "the server is near its limit; retry after 1000 ms",
        "DEADLINE_EXCEEDED": "deadline passed",
    }
    report = build_report(merged, {"warmup_s": 1.0}, 1.0, {"description": "fixed concurrency 2"})
    assert report["status_messages"] == merged.status_messages
    summary = format_summary(report)
    assert "  first UNAVAILABLE: the server is near its limit; retry after 1000 ms" in summary
    assert "  first DEADLINE_EXCEEDED: deadline passed" in summary
    assert "met the 100 ms budget on every chunk after the first 1 s" in summary


def _lag_summary(means_ms: list[float], budget_ms: float = 100.0) -> tuple[dict, str]:
    """Return the lag report and summary line of a run with one chunk per second at these latencies."""
    from streaminfer.loadtest.report import build_report, format_summary

    recorder = Recorder(budget_ms=budget_ms)
    for second, latency_ms in enumerate(means_ms):
        recorder.record_latency("audio", latency_ms / 1000, second)
    report = build_report(recorder, {}, float(len(means_ms)), {"description": "fixed concurrency 1"})
    (line,) = [line for line in format_summary(report).splitlines() if line.startswith("lag:")]
    return report["lag"], line


# The latencies go through an HDR histogram of 2 significant digits, so the means printed are close, not equal.
@pytest.mark.parametrize(
    ("means_ms", "trend", "words"),
    [
        # Nearly four times the first third's latency, though under half the budget.
        ([11.5, 11.5, 11.5, 43.8, 43.8, 43.8], "growing", r"\(growing by 3\d\.\d ms\)"),
        ([11.5, 11.5, 11.5, 12.5, 12.5, 12.5], "steady", r"\(steady\)"),
        # Twice the latency but only 3 ms more: jitter of a fast server.
        ([3.0, 3.0, 3.0, 6.0, 6.0, 6.0], "steady", r"\(steady\)"),
        ([40.0, 40.0, 40.0, 10.0, 10.0, 10.0], "falling", r"\(falling by \d\d\.\d ms\)"),
        (
            [10.0, 10.0, 10.0, 70.0, 70.0, 70.0],
            "growing",
            r"\(growing by \d\d\.\d ms, over half the 100 ms budget: the server falls behind real time\)",
        ),
    ],
)
def test_lag_trend_labels(means_ms: list[float], trend: str, words: str) -> None:
    lag, line = _lag_summary(means_ms)
    assert lag["trend"] == trend
    assert lag["growing"] is (trend == "growing")
    assert re.fullmatch(r"lag: mean latency \d+\.\d ms in the first third, \d+\.\d ms in the last third " + words, line)


def test_lag_without_data_says_so() -> None:
    lag, line = _lag_summary([12.0, 12.0])
    assert lag["trend"] == "no data"
    assert lag["growing"] is False
    assert lag["growth_over_half_budget"] is False
    assert line == "lag: no data, because fewer than 3 seconds of the run have answered chunks"
    assert "steady" not in line


def test_lag_trend_thresholds() -> None:
    from streaminfer.loadtest.report import LAG_CHANGE_MIN_MS, LAG_CHANGE_RATIO, lag_trend

    assert lag_trend(10.0, 10.0 * LAG_CHANGE_RATIO) == "growing"
    assert lag_trend(10.0, 10.0 * LAG_CHANGE_RATIO - 0.1) == "steady"
    assert lag_trend(2.0, 2.0 + LAG_CHANGE_MIN_MS) == "growing"
    assert lag_trend(2.0, 2.0 + LAG_CHANGE_MIN_MS - 0.1) == "steady"
    assert lag_trend(None, 10.0) == "no data"
    assert lag_trend(10.0, None) == "no data"


# Runs against a real server


def _run(tmp_path, capsys, target: str, *args: str) -> tuple[int, dict, str]:
    report_path = tmp_path / "report.json"
    status = cli.main(
        ["--target", target, "--media-dir", str(MEDIA), "--quiet", "--json", str(report_path), "--drain", "5", *args]
    )
    out = capsys.readouterr().out
    return status, json.loads(report_path.read_text()), out


def _check_counts(report: dict) -> None:
    c = report["counts"]
    assert c["chunks_sent"] > 0
    assert c["chunks_sent"] == c["chunks_acked"] + c["chunk_errors"] + c["chunks_unanswered"]
    assert c["chunks_unanswered"] == 0
    latency = report["chunk_latency_ms"]
    values = [latency[k] for k in ("p50", "p90", "p99", "p99.9", "max")]
    assert all(v is not None and v > 0 for v in values)
    assert values == sorted(values)
    assert report["histograms"]["counters"]["chunks_acked"] == c["chunks_acked"]


def test_fixed_concurrency_audio_run(vad_server: ServerThread, tmp_path, capsys) -> None:
    status, report, out = _run(
        tmp_path, capsys, vad_server.target, "--concurrency", "4", "--duration", "3", "--plot", str(tmp_path / "run.png")
    )
    _check_counts(report)
    c = report["counts"]
    assert status == 0
    assert c["streams_planned"] == c["streams_opened"] == 4
    assert report["status_codes"] == {"OK": 4}
    # 3 s of 32 ms chunks per stream: 94 each, or 93 for a stream that starts a little later.
    assert 4 * 93 <= c["chunks_sent"] <= 4 * 94
    for key in (
        "chunk_latency_ms", "time_to_first_result_ms", "stream_setup_ms", "lag", "messages_per_second",
        "status_codes", "drop_reasons", "goodput", "latency_by_second_ms", "offered", "settings",
    ):
        assert key in report
    assert report["stream_setup_ms"]["p50"] is not None
    assert report["goodput"]["streams"] == 4
    assert 0 <= report["goodput"]["good_streams"] <= 4
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "chunk latency (scheduled -> ack)" in out
    assert f"{c['chunks_sent']} sent = {c['chunks_acked']} acked" in out


def test_ramp_tiny_budget_stops_early(vad_server: ServerThread, tmp_path, capsys) -> None:
    status, report, out = _run(
        tmp_path, capsys, vad_server.target, "--ramp", "1:1:1:3", "--duration", "10", "--budget-ms", "0.001"
    )
    ramp = report["ramp"]
    # No chunk gets its ack within a microsecond, so the first step breaks and the ramp goes no further.
    assert [level["concurrency"] for level in ramp["levels"]] == [1]
    assert ramp["levels"][0]["passed"] is False
    assert ramp["broke_at_concurrency"] == 1
    assert ramp["last_passing_concurrency"] is None
    assert report["counts"]["streams_planned"] == 1
    assert "last concurrency that passed: none" in out


def test_ramp_large_budget_reaches_max(vad_server: ServerThread, tmp_path, capsys) -> None:
    status, report, out = _run(
        tmp_path, capsys, vad_server.target, "--ramp", "1:1:1:2", "--duration", "10", "--budget-ms", "60000"
    )
    ramp = report["ramp"]
    assert [level["concurrency"] for level in ramp["levels"]] == [1, 2]
    assert all(level["passed"] for level in ramp["levels"])
    assert ramp["last_passing_concurrency"] == 2
    assert ramp["broke_at_concurrency"] is None
    _check_counts(report)


def test_two_processes(vad_server: ServerThread, tmp_path, capsys) -> None:
    status, report, out = _run(
        tmp_path, capsys, vad_server.target, "--processes", "2", "--concurrency", "2", "--duration", "2"
    )
    _check_counts(report)
    c = report["counts"]
    assert c["streams_opened"] == 2
    # Each stream sends 2 s of 32 ms chunks (62 or 63); the two processes' figures are merged.
    assert 2 * 62 <= c["chunks_sent"] <= 2 * 63
    assert report["histograms"]["counters"]["chunks_sent"] == c["chunks_sent"]


def test_run_with_tls_and_api_key(
    secured_vad_server: ServerThread, certificates: pathlib.Path, tmp_path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMINFER_API_KEY", API_KEY)
    status, report, out = _run(
        tmp_path, capsys, secured_vad_server.target, "--ca-file", str(certificates / "ca.pem"),
        "--concurrency", "1", "--duration", "1",
    )

    assert status == 0
    assert report["status_codes"] == {"OK": 1}
    _check_counts(report)
    assert report["settings"]["tls"] is True
    assert report["settings"]["api_key_sent"] is True
    assert API_KEY not in (tmp_path / "report.json").read_text()


def test_run_with_client_certificate(
    client_certificate_server: ServerThread, certificates: pathlib.Path, tmp_path, capsys
) -> None:
    status, report, out = _run(
        tmp_path, capsys, client_certificate_server.target, "--ca-file", str(certificates / "ca.pem"),
        "--cert-file", str(certificates / "client.pem"), "--key-file", str(certificates / "client.key"),
        "--concurrency", "1", "--duration", "1",
    )

    assert status == 0
    assert report["status_codes"] == {"OK": 1}
    _check_counts(report)
    assert report["settings"]["tls"] is True


def test_run_with_wrong_api_key_hints(
    secured_vad_server: ServerThread, certificates: pathlib.Path, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_path = tmp_path / "report.json"
    status = cli.main(
        ["--target", secured_vad_server.target, "--media-dir", str(MEDIA), "--quiet", "--json", str(report_path),
         "--tls", "--ca-file", str(certificates / "ca.pem"), "--api-key", "not-the-key",
         "--concurrency", "1", "--duration", "1", "--drain", "5"]
    )

    report = json.loads(report_path.read_text())
    assert status == 3
    assert report["status_codes"] == {"UNAUTHENTICATED": 1}
    assert "not accepted" in report["status_messages"]["UNAUTHENTICATED"]
    assert report["counts"]["streams_failed"] == 1
    assert "streaminfer-loadtest: hint: check the API key" in capsys.readouterr().err


def test_plaintext_run_tls_server_hints(
    secured_vad_server: ServerThread, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_path = tmp_path / "report.json"
    status = cli.main(
        ["--target", secured_vad_server.target, "--media-dir", str(MEDIA), "--quiet", "--json", str(report_path),
         "--api-key", API_KEY, "--concurrency", "1", "--duration", "1", "--drain", "5"]
    )

    report = json.loads(report_path.read_text())
    assert status == 3
    assert list(report["status_codes"]) == ["UNAVAILABLE"]
    assert "streaminfer-loadtest: hint: if the server uses TLS, add --tls" in capsys.readouterr().err


def test_bad_options_are_refused() -> None:
    with pytest.raises(SystemExit):
        cli.main(["--duration", "0"])
    with pytest.raises(SystemExit):
        cli.main(["--ramp", "1:1:1:3", "--processes", "2"])
    with pytest.raises(SystemExit):
        cli.main(["--concurrency", "2", "--arrival-rate", "1"])


def test_generated_video_frame_is_a_jpeg() -> None:
    from streaminfer.loadtest.media import VideoSource, generated_jpeg

    frame = generated_jpeg()
    assert frame[:2] == b"\xff\xd8"
    assert frame[-2:] == b"\xff\xd9"
    source = VideoSource.load(None, fps=4.0)
    assert source.interval_s == 0.25
    assert source.chunk(0, 0) == frame


def test_mix_interleaves_stream_kinds_by_weight() -> None:
    from streaminfer.loadtest.runner import kind_pattern

    pattern = kind_pattern("mix", (2, 1, 1))
    assert sorted(pattern) == ["audio", "audio", "text", "video"]
    assert pattern[0] == "audio"
    assert pattern[-1] == "audio"
    assert kind_pattern("text", (8, 1, 1)) == ["text"]
