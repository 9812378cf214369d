"""The load itself: planned streams, sent at real-time pace, each chunk timed from its scheduled send time.

Every stream has a scheduled start, and chunk ``k`` of a stream is scheduled at
a fixed offset from that start. Setup time, time to first result and chunk
latency all count from those scheduled times, not from the moment the sender
actually wrote. So a server that stalls the client shows in the figures instead
of hiding behind a slower send rate (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any, Protocol

from streaminfer.client import (
    AsyncClient,
    AudioFormat,
    ChunkFailed,
    ChunksAcked,
    Result,
    RetryPolicy,
    StreamEnded,
    StreaminferError,
    VideoFormat,
    stream_config,
    tls_credentials,
)

from streaminfer.loadtest.media import AudioSource, TextSource, VideoSource
from streaminfer.loadtest.schedule import Ramp, poisson_arrivals
from streaminfer.loadtest.stats import Recorder

__all__ = ["ChunkBook", "LoadConfig", "StreamPlan", "plan_streams", "run_load", "send_paced"]

# The SDK numbers each modality's chunks from 1.
FIRST_SEQUENCE_NUMBER = 1
KINDS = ("audio", "video", "text")


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    """One run's settings; see the command's --help for units and defaults."""

    target: str = "127.0.0.1:50051"
    scenario: str = "audio"
    mix: tuple[int, int, int] = (8, 1, 1)
    duration_s: float = 30.0
    stream_s: float | None = None
    concurrency: int | None = None
    arrival_rate: float | None = None
    ramp: Ramp | None = None
    seed: int = 1
    max_streams: int = 10_000
    budget_ms: float = 100.0
    # Seconds at the start of each stream whose chunks goodput does not judge.
    warmup_s: float = 0.0
    drain_s: float = 10.0
    chunk_ms: float = 32.0
    sample_rate: int = 16_000
    signal: str | None = None
    media_dir: str = "media"
    fps: float = 2.0
    wpm: float = 150.0
    audio_model: str = "silero_vad"
    video_model: str = "hog_people"
    text_model: str = "minilm_embedding"
    connections: int = 4
    retries: int = 0
    progress: bool = True
    # Sent in the x-api-key metadata of every stream; None sends none.
    api_key: str | None = None
    # TLS, trusting ca_file's certificates, or gRPC's default roots without one.
    tls: bool = False
    ca_file: str | None = None
    # The client certificate chain and its key, for a server that requires client certificates.
    cert_file: str | None = None
    key_file: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class StreamPlan:
    """One stream: its index, kind, scheduled start and length (seconds from the run's start)."""

    index: int
    kind: str
    start_s: float
    length_s: float


def kind_pattern(scenario: str, mix: tuple[int, int, int]) -> list[str]:
    """Return the stream kinds in the order streams take them; a mix interleaves kinds by weight."""
    if scenario in KINDS:
        return [scenario]
    if scenario != "mix":
        raise ValueError(f"scenario {scenario!r} is invalid: expected audio, video, text or mix")
    if sum(mix) <= 0 or min(mix) < 0:
        raise ValueError(f"mix weights {mix!r} are invalid: expected whole numbers >= 0, not all 0")
    slots = [((j + 0.5) / weight, kind) for kind, weight in zip(KINDS, mix, strict=True) for j in range(weight)]
    return [kind for _, kind in sorted(slots)]


def plan_streams(config: LoadConfig) -> list[StreamPlan]:
    """Plan every stream of a fixed-concurrency or open-loop run before it starts."""
    kinds = kind_pattern(config.scenario, config.mix)
    plans: list[StreamPlan] = []
    if config.arrival_rate is not None:
        length = config.stream_s if config.stream_s is not None else min(10.0, config.duration_s)
        for index, start in enumerate(
            poisson_arrivals(config.arrival_rate, config.duration_s, config.seed, config.max_streams)
        ):
            plans.append(StreamPlan(index, kinds[index % len(kinds)], start, min(length, config.duration_s - start)))
        return plans
    slots = config.concurrency or 1
    length = config.stream_s if config.stream_s is not None else config.duration_s
    # Slots start spread over one chunk interval (at most 1 s), so chunks do not all leave together.
    spread = min(1.0, config.chunk_ms / 1000.0)
    for slot in range(slots):
        start = slot / slots * spread
        while start < config.duration_s and len(plans) < config.max_streams:
            plans.append(StreamPlan(len(plans), kinds[slot % len(kinds)], start, min(length, config.duration_s - start)))
            start += length
    return plans


class Sources:
    """The payload sources a run needs, built once per process."""

    def __init__(self, config: LoadConfig, kinds: set[str]) -> None:
        media = pathlib.Path(config.media_dir)
        self.audio = self.video = self.text = None
        if "audio" in kinds:
            if config.signal:
                self.audio = AudioSource.generated(config.signal, config.sample_rate, config.chunk_ms)
            else:
                wav = media / "audio" / "speech_sample.wav"
                if not wav.exists():
                    raise FileNotFoundError(f"{wav}: no sample audio; pass --media-dir or --signal")
                self.audio = AudioSource.from_wav(wav, config.sample_rate, config.chunk_ms)
        if "video" in kinds:
            self.video = VideoSource.load(media / "video" / "vtest.avi", config.fps)
        if "text" in kinds:
            self.text = TextSource.load(media / "text" / "gpl3_preamble.txt", config.wpm)


class Session(Protocol):
    async def send_audio(self, content: bytes, timestamp: float | None = None) -> int: ...
    async def send_frame(self, content: bytes, timestamp: float | None = None) -> int: ...
    async def send_text(self, text: str | bytes, timestamp: float | None = None) -> int: ...
    async def end_input(self) -> None: ...


class ChunkBook:
    """Scheduled send times of a stream's chunks until the server acks or fails each one."""

    def __init__(
        self,
        recorder: Recorder,
        kind: str,
        t0: float,
        level_of: Callable[[float], int | None],
        judged_from: float = -math.inf,
    ) -> None:
        self.recorder = recorder
        self.kind = kind
        self.t0 = t0
        self.level_of = level_of
        # Chunks scheduled before this time count in the latency figures but not in max_latency_s (goodput).
        self.judged_from = judged_from
        # Sequence number -> scheduled send time, for chunks written and still without an ack or error.
        self.scheduled: dict[int, float] = {}
        self.max_latency_s = 0.0
        self.has_failed_chunk = False

    def acked(self, first: int, last: int, now: float) -> None:
        for sequence_number in range(first, last + 1):
            when = self.scheduled.pop(sequence_number, None)
            if when is None:
                continue
            latency = now - when
            if when >= self.judged_from:
                self.max_latency_s = max(self.max_latency_s, latency)
            self.recorder.count("chunks_acked")
            self.recorder.record_latency(self.kind, latency, int(max(0.0, when - self.t0)), self.level_of(when))

    def failed(self, sequence_number: int, reason: str, from_client: bool) -> None:
        if self.scheduled.pop(sequence_number, None) is None:
            return
        self.has_failed_chunk = True
        if from_client:
            self.recorder.count("chunks_unanswered")
            self.recorder.drop_reasons["UNANSWERED"] += 1
        else:
            self.recorder.count("chunk_errors")
            self.recorder.drop_reasons[reason] += 1

    def abandon(self) -> None:
        """Count every chunk still waiting as unanswered."""
        if self.scheduled:
            self.has_failed_chunk = True
            self.recorder.count("chunks_unanswered", len(self.scheduled))
            self.recorder.drop_reasons["UNANSWERED"] += len(self.scheduled)
            self.scheduled.clear()


async def send_paced(
    session: Session,
    book: ChunkBook,
    payloads: Callable[[int], tuple[bytes | str, float]],
    start: float,
    end: float,
    clock: Callable[[], float],
    stop: asyncio.Event | None = None,
    max_chunks: int = 1_000_000,
) -> None:
    """Send chunk ``k`` at its scheduled time, ``start`` plus the lengths of the chunks before it.

    ``payloads(k)`` returns the chunk and its media length in seconds. The
    schedule never moves: a sender that falls behind (a full window, a slow
    write, a late start) sends the overdue chunks at once, and their latency
    still counts from their scheduled times. Stops at ``end``, at ``stop`` or
    after ``max_chunks`` chunks, then half-closes the stream.
    """
    recorder = book.recorder
    when = start
    offset = 0.0
    index = 0
    send = {"audio": session.send_audio, "video": session.send_frame, "text": session.send_text}[book.kind]
    while when < end and index < max_chunks and not (stop is not None and stop.is_set()):
        delay = when - clock()
        if delay > 0:
            await asyncio.sleep(delay)
            if stop is not None and stop.is_set():
                break
        content, length_s = payloads(index)
        expected = FIRST_SEQUENCE_NUMBER + index
        book.scheduled[expected] = when
        recorder.send_lateness.record_value(max(1, round((clock() - when) * 1e6)))
        try:
            number = await send(content, when - start)
        except BaseException:
            book.scheduled.pop(expected, None)
            raise
        if number != expected:
            book.scheduled[number] = book.scheduled.pop(expected, when)
        recorder.count("chunks_sent")
        recorder.count("requests_sent")
        index += 1
        offset += length_s
        when = start + offset
    await session.end_input()


class LoadRun:
    """Runs planned streams on one event loop and records what happened."""

    def __init__(self, config: LoadConfig, recorder: Recorder | None = None) -> None:
        self.config = config
        self.recorder = recorder or Recorder(budget_ms=config.budget_ms)
        self.open_streams = 0
        self.books: set[ChunkBook] = set()
        self.stop = asyncio.Event()
        self.t0 = 0.0
        self.ramp_levels: list[int] = config.ramp.levels() if config.ramp else []
        self.ramp_result: dict[str, Any] | None = (
            {"levels": [], "last_passing_concurrency": None, "broke_at_concurrency": None} if config.ramp else None
        )
        self.clients: list[AsyncClient] = []
        kinds = set(kind_pattern(config.scenario, config.mix))
        self.sources = Sources(config, kinds)

    def clock(self) -> float:
        return asyncio.get_running_loop().time()

    def level_of(self, when: float) -> int | None:
        if self.config.ramp is None:
            return None
        return min(len(self.ramp_levels) - 1, max(0, int((when - self.t0) / self.config.ramp.every_s)))

    def stream_config(self, kind: str):  # type: ignore[no-untyped-def]
        c = self.config
        if kind == "audio":
            return stream_config([c.audio_model], audio=AudioFormat(c.sample_rate))
        if kind == "video":
            return stream_config([c.video_model], video=VideoFormat("jpeg"))
        return stream_config([c.text_model])

    def payloads(self, kind: str, stream_index: int) -> Callable[[int], tuple[bytes | str, float]]:
        if kind == "audio":
            audio = self.sources.audio
            assert audio is not None
            return lambda k: (audio.chunk(stream_index, k), audio.interval_s)
        if kind == "video":
            video = self.sources.video
            assert video is not None
            return lambda k: (video.chunk(stream_index, k), video.interval_s)
        text = self.sources.text
        assert text is not None

        def sentence(k: int) -> tuple[str, float]:
            words = text.sentence(stream_index, k)
            return words, text.duration_s(words)

        return sentence

    async def run_stream(self, plan: StreamPlan, end_override: float | None = None) -> None:
        """Open one stream at its scheduled start, send until its end, then wait up to drain_s for the responses."""
        recorder = self.recorder
        start = self.t0 + plan.start_s
        end = end_override if end_override is not None else start + plan.length_s
        delay = start - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        if self.stop.is_set():
            return
        recorder.count("streams_planned")
        client = self.clients[plan.index % len(self.clients)]
        # The whole stream, setup and draining included, has a deadline, so no stream outlives the run.
        deadline_s = max(1.0, end - self.clock()) + self.config.drain_s
        try:
            session = await client.open_stream(self.stream_config(plan.kind), timeout=deadline_s)
        except StreaminferError as error:
            recorder.count("streams_failed")
            recorder.count_status(error.code.name if error.code is not None else "CLIENT_ERROR", error.details)
            return
        recorder.count("requests_sent")
        recorder.count("streams_opened")
        recorder.setup.record_value(max(1, round((self.clock() - start) * 1e6)))

        book = ChunkBook(recorder, plan.kind, self.t0, self.level_of, judged_from=start + self.config.warmup_s)
        self.books.add(book)
        self.open_streams += 1
        status = "OK"
        message = ""
        sender = asyncio.create_task(
            send_paced(session, book, self.payloads(plan.kind, plan.index), start, end, self.clock, self.stop)
        )

        first_result = True
        try:
            async with session:
                async for event in session:
                    now = self.clock()
                    recorder.count("events_received")
                    if isinstance(event, ChunksAcked):
                        book.acked(event.first_sequence_number, event.last_sequence_number, now)
                    elif isinstance(event, ChunkFailed):
                        book.failed(event.sequence_number, event.reason, event.from_client)
                    elif isinstance(event, Result):
                        recorder.count("results")
                        if first_result:
                            first_result = False
                            recorder.first_result.record_value(max(1, round((now - start) * 1e6)))
                    elif isinstance(event, StreamEnded):
                        pass
        except StreaminferError as error:
            status = error.code.name if error.code is not None else "CLIENT_ERROR"
            message = error.details
        finally:
            if not sender.done():
                sender.cancel()
            try:
                await sender
            except (asyncio.CancelledError, StreaminferError, RuntimeError):
                pass
            self.open_streams -= 1
            self.books.discard(book)
            book.abandon()

        recorder.count_status(status, message)
        if status == "OK" and not book.has_failed_chunk and book.max_latency_s * 1000.0 <= self.config.budget_ms:
            recorder.count("streams_good")

    async def _ramp(self) -> None:
        """Add streams step by step, and judge each step once its chunks have had the budget to get their acks."""
        ramp = self.config.ramp
        assert ramp is not None
        tasks: list[asyncio.Task[None]] = []
        run_end = self.t0 + min(self.config.duration_s, len(self.ramp_levels) * ramp.every_s)
        budget_s = self.config.budget_ms / 1000.0
        last_passing: int | None = None
        broke_at: int | None = None
        levels_report = []
        running = 0
        spread = min(1.0, self.config.chunk_ms / 1000.0)
        kinds = kind_pattern(self.config.scenario, self.config.mix)

        for step, level in enumerate(self.ramp_levels):
            step_start = step * ramp.every_s
            if self.t0 + step_start >= run_end:
                break
            new = level - running
            for j in range(new):
                index = running + j
                plan = StreamPlan(index, kinds[index % len(kinds)], step_start + j / max(1, new) * spread, 0.0)
                tasks.append(asyncio.create_task(self.run_stream(plan, end_override=run_end)))
            running = level

            # The step's last chunks get the budget, at most one more step, to get their acks before judging.
            judge_at = self.t0 + (step + 1) * ramp.every_s + min(budget_s, ramp.every_s)
            await asyncio.sleep(max(0.0, judge_at - self.clock()))
            verdict = self._judge_level(step)
            verdict["concurrency"] = level
            levels_report.append(verdict)
            if verdict["passed"]:
                last_passing = level
            else:
                broke_at = level
            self.ramp_result = {
                "levels": levels_report, "last_passing_concurrency": last_passing, "broke_at_concurrency": broke_at,
            }
            if broke_at is not None:
                break
        self.stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _judge_level(self, step: int) -> dict[str, Any]:
        """Judge a ramp step: it passes when under 1 % of its chunks missed the budget, unanswered ones past the budget included."""
        ramp = self.config.ramp
        assert ramp is not None
        histogram = self.recorder.latency_by_level.get(step)
        answered = histogram.get_total_count() if histogram is not None else 0
        budget_us = self.config.budget_ms * 1000.0
        over = 0
        p99_ms = None
        if histogram is not None and answered:
            p99_ms = histogram.get_value_at_percentile(99.0) / 1000.0
            over = _count_above(histogram, budget_us)
        level_end = self.t0 + (step + 1) * ramp.every_s
        level_start = self.t0 + step * ramp.every_s
        now = self.clock()
        waiting = [when for book in self.books for when in book.scheduled.values() if level_start <= when < level_end]
        # A chunk still unanswered after the budget has missed it already.
        late = sum(1 for when in waiting if now - when > self.config.budget_ms / 1000.0)
        total = answered + len(waiting)
        misses = over + late
        passed = total > 0 and misses <= 0.01 * total and self.recorder.counters["streams_failed"] == 0
        return {"step": step, "chunks": total, "over_budget": over, "unanswered_at_judging": len(waiting), "unanswered_over_budget": late, "p99_ms": p99_ms, "passed": passed}

    async def _progress(self, report: Callable[[dict[str, Any]], None]) -> None:
        last_sent = self.recorder.counters["chunks_sent"]
        last_time = self.clock()
        while True:
            await asyncio.sleep(1.0)
            now = self.clock()
            sent = self.recorder.counters["chunks_sent"]
            histogram = self.recorder.latency
            report(
                {
                    "elapsed_s": now - self.t0,
                    "open_streams": self.open_streams,
                    "chunks_per_s": (sent - last_sent) / max(1e-9, now - last_time),
                    "p99_ms": histogram.get_value_at_percentile(99.0) / 1000.0 if histogram.get_total_count() else None,
                    "errors": self.recorder.counters["chunk_errors"] + self.recorder.counters["streams_failed"],
                }
            )
            last_sent, last_time = sent, now

    async def run(
        self, plans: list[StreamPlan], t0_wall: float | None = None, progress: Callable[[dict[str, Any]], None] | None = None
    ) -> Recorder:
        """Run ``plans`` (or the ramp), starting at wall-clock time ``t0_wall`` (default: in 0.5 s)."""
        loop = asyncio.get_running_loop()
        start_wall = t0_wall if t0_wall is not None else time.time() + 0.5
        self.t0 = loop.time() + (start_wall - time.time())
        self.clients = create_clients(self.config)
        reporter = asyncio.create_task(self._progress(progress)) if progress is not None else None
        # A hard bound on the whole run, in case a stream's own deadline does not end it.
        hard_limit = self.config.duration_s + self.config.drain_s + 30.0 + max(0.0, self.t0 - loop.time())
        try:
            if self.config.ramp is not None:
                work = self._ramp()
            else:
                work = asyncio.gather(*(self.run_stream(plan) for plan in plans))
            try:
                await asyncio.wait_for(work, timeout=hard_limit)
            except TimeoutError:
                self.recorder.status_codes["LOADTEST_TIMEOUT"] += 1
        finally:
            if reporter is not None:
                reporter.cancel()
            for client in self.clients:
                await client.close()
        return self.recorder


def create_clients(config: LoadConfig) -> list[AsyncClient]:
    """Create one client per connection, each with the run's retries, TLS credentials and API key."""
    policy = RetryPolicy(max_attempts=1 + config.retries)
    credentials = (
        tls_credentials(config.ca_file, config.cert_file, config.key_file)
        if config.tls or config.ca_file or config.cert_file
        else None
    )
    return [
        AsyncClient(config.target, credentials=credentials, api_key=config.api_key, retry_policy=policy)
        for _ in range(max(1, config.connections))
    ]


def _count_above(histogram: Any, limit_us: float) -> int:
    """Recorded values above ``limit_us``."""
    total = histogram.get_total_count()
    if total == 0:
        return 0
    below = 0
    for item in histogram.get_recorded_iterator():
        if item.value_iterated_to <= limit_us:
            below += item.count_added_in_this_iter_step
    return total - below


async def run_load(
    config: LoadConfig,
    plans: list[StreamPlan] | None = None,
    t0_wall: float | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Recorder, dict[str, Any] | None]:
    """Run one process's share of the load; return its recorder and, for a ramp, the ramp's verdicts."""
    run = LoadRun(config)
    if plans is None and config.ramp is None:
        plans = plan_streams(config)
    await run.run(plans or [], t0_wall, progress)
    return run.recorder, run.ramp_result
