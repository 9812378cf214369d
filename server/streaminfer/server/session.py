"""One client stream: its config, its chunk ledger, and its outbound results.

A Session lives on the event loop, with one part on a decode thread. The
reader validates each client message and hands the chunk to the stream's
decode thread, which decodes and preprocesses it and submits the model inputs
to the models' runners. Runners hand finished items back on the loop through
``on_items_done``, which releases results in each stream's order,
acknowledges the chunks every model has completed, and wakes the writer.

Thread ownership: the preprocess states, the audio sample count, the text
decoder and each slot's ``next_index`` belong to the decode thread. Every
other field belongs to the loop.

Every chunk is answered once: by a ChunkAck when every model of its modality
has completed it, or by a ChunkError. The in-flight window
(``max_chunks_in_flight``) counts chunks whose answer has not been written to
the call yet; at the window the reader stops reading, so HTTP/2 flow control
holds the client back instead of server memory growing. Because an answer
counts until it is written, a client that stops reading results also stops
the server from reading its chunks, and its pending answers stay bounded.

Overflow policy: audio and text are lossless (the window holds the client
back). Video is keep-latest: when more than ``max_pending_frames`` frames wait
for their models, the oldest waiting frame is dropped with reason OVERFLOW.

Each chunk gets a deadline when it is read: the read time plus the stream's
chunk latency budget. Work that can no longer meet it is dropped before inference with
reason DEADLINE, by the decode thread or by the model's batcher.

The server can end a stream itself (drain, maximum duration, idle): it stops
reading, flushes buffered input, answers every chunk it read and sends a
StreamEnd that names the reason.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import functools
import logging
import math
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError

from streaminfer.server import logs, metrics
from streaminfer.server.batcher import PRIORITY_BULK, PRIORITY_INTERACTIVE, ItemDropped, ModelRunner, QueueFull, WorkItem
from streaminfer.server.decode import TextDecoder, decode_audio, decode_image
from streaminfer.server.errors import ChunkRejected, FailedPrecondition, InvalidArgument, NotFound, StreaminferError
from streaminfer.server.models.base import DecodedChunk, ModelInput, StreamOptions
from streaminfer.server.tracing import ChunkTrace
from streaminfer.v1 import streaminfer_pb2 as pb

if TYPE_CHECKING:
    from streaminfer.server.app import Executor

logger = logging.getLogger(__name__)

# Below every int64 sequence number a client can send.
NO_SEQUENCE_NUMBER = -(1 << 63) - 1
# A stream whose audio was not read for this long counts as paused, not late.
AUDIO_PACE_WINDOW_S = 1.0
MAX_SAMPLE_RATE_HERTZ = 384_000
MIN_SAMPLE_RATE_HERTZ = 1_000
MAX_AUDIO_CHANNELS = 32

_MODALITY_FIELDS = {"audio": pb.MODALITY_AUDIO, "frame": pb.MODALITY_VIDEO, "text": pb.MODALITY_TEXT}
_MODALITY_NAMES = {pb.MODALITY_AUDIO: "audio", pb.MODALITY_VIDEO: "frame", pb.MODALITY_TEXT: "text"}


class StreamPhase(enum.Enum):
    STREAMING = "streaming"
    INPUT_ENDED = "input ended"
    CLOSED = "closed"


@dataclasses.dataclass(eq=False)
class FrameTicket:
    """A video frame between its arrival and its answer, for the keep-latest policy."""

    sequence_number: int
    items: list[WorkItem] = dataclasses.field(default_factory=list)
    superseded: bool = False
    message: str = ""

    def supersede(self, message: str) -> None:
        """Drop the frame if it has not started. Runs on the loop; the decode thread checks the flag too."""
        self.superseded = True
        self.message = message
        for item in self.items:
            item.cancel_message = message
            item.cancelled = True


@dataclasses.dataclass(eq=False)
class ModelSlot:
    """One model's place in one stream: its states and its release order."""

    runner: ModelRunner
    modality: int
    preprocess_state: Any
    inference_state: Any
    next_index: int = 0
    next_release: int = 0
    done: dict[int, WorkItem] = dataclasses.field(default_factory=dict)
    # Chunks up to this sequence number are complete for this model.
    completed_through: int = NO_SEQUENCE_NUMBER
    metric_results: Any = None
    metric_latency: Any = None
    metric_input_wait: Any = None
    # Decode thread: chunks decoded that no submitted input completes yet,
    # with when they were decoded.
    awaiting_input: collections.deque[tuple[int, float]] = dataclasses.field(default_factory=collections.deque)

    def __post_init__(self) -> None:
        modality = metrics.modality_label(self.modality)
        self.metric_results = metrics.RESULTS.labels(self.name, modality)
        self.metric_latency = metrics.CHUNK_LATENCY.labels(self.name, modality)
        self.metric_input_wait = metrics.INPUT_WAIT.labels(self.name)

    @property
    def name(self) -> str:
        return self.runner.config.name

    @property
    def idle(self) -> bool:
        return self.next_release == self.next_index


@dataclasses.dataclass(eq=False)
class Ledger:
    """The chunks of one modality that were received and have no ack or error yet."""

    modality: int
    slots: list[ModelSlot]
    pending: collections.deque[int] = dataclasses.field(default_factory=collections.deque)
    errored: set[int] = dataclasses.field(default_factory=set)
    last_sequence_number: int | None = None
    received: int = 0
    acked: int = 0
    failed: int = 0
    # When each pending chunk was read, for its latency.
    arrivals: dict[int, float] = dataclasses.field(default_factory=dict)
    # This modality's metrics, looked up once.
    metric_received: Any = None
    metric_processed: Any = None
    metric_decode_wait: Any = None
    metric_decode: Any = None

    def __post_init__(self) -> None:
        modality = metrics.modality_label(self.modality)
        self.metric_received = metrics.CHUNKS_RECEIVED.labels(modality)
        self.metric_processed = metrics.CHUNKS_PROCESSED.labels(modality)
        self.metric_decode_wait = metrics.DECODE_WAIT.labels(modality)
        self.metric_decode = metrics.DECODE.labels(modality)


class Session:
    """The server side of one Stream call."""

    def __init__(self, executor: Executor, config: pb.StreamConfig, peer: str = "") -> None:
        self.stream_id = secrets.token_hex(8)
        self.closed = False
        self.phase = StreamPhase.STREAMING
        self.failure: StreaminferError | None = None
        self._executor = executor
        self._limits = executor.config.limits
        self._config = config
        self._peer = peer

        self._validate_formats(config)
        self.options = StreamOptions(
            stream_id=self.stream_id,
            interim_results=config.interim_results,
            audio_sample_rate_hertz=config.audio_format.sample_rate_hertz,
        )
        self._ledgers: dict[int, Ledger] = {}
        for selection in self._resolve_models(config):
            runner = executor.runners[selection.model]
            model = runner.model
            slot = ModelSlot(
                runner=runner,
                modality=selection.modality,
                preprocess_state=model.new_preprocess_state(self.options),
                inference_state=model.new_inference_state(self.options),
            )
            self._ledgers.setdefault(selection.modality, Ledger(selection.modality, [])).slots.append(slot)

        budget_s = config.chunk_latency_budget.ToNanoseconds() / 1e9
        if budget_s < 0:
            raise InvalidArgument(
                f"config.chunk_latency_budget = {budget_s:.3f} s is invalid: expected a positive duration, "
                "or zero for the server default"
            )
        self.budget_s = budget_s or self._limits.chunk_latency_budget_ms / 1000.0
        if config.priority not in (pb.PRIORITY_UNSPECIFIED, pb.PRIORITY_INTERACTIVE, pb.PRIORITY_BULK):
            raise InvalidArgument(
                f"config.priority = {config.priority} is invalid: expected PRIORITY_INTERACTIVE or PRIORITY_BULK"
            )
        self.priority = PRIORITY_BULK if config.priority == pb.PRIORITY_BULK else PRIORITY_INTERACTIVE
        if config.video_overflow_policy not in (
            pb.OVERFLOW_POLICY_UNSPECIFIED,
            pb.OVERFLOW_POLICY_BACKPRESSURE,
            pb.OVERFLOW_POLICY_KEEP_LATEST,
        ):
            raise InvalidArgument(
                f"config.video_overflow_policy = {config.video_overflow_policy} is invalid: expected "
                "OVERFLOW_POLICY_BACKPRESSURE or OVERFLOW_POLICY_KEEP_LATEST"
            )
        self._keep_latest_video = config.video_overflow_policy != pb.OVERFLOW_POLICY_BACKPRESSURE
        self._frames: collections.OrderedDict[int, FrameTicket] = collections.OrderedDict()

        self._audio_channels = max(1, config.audio_format.audio_channel_count)
        self._audio_samples = 0
        self._text_decoder = TextDecoder()
        self._loop = asyncio.get_running_loop()
        self._lane = executor.decode.assign_lane(spread=pb.MODALITY_VIDEO in self._ledgers)
        # Chunks read and not yet answered in a written message.
        self._in_flight = 0
        # Chunks answered in the message being built, and in the one being written.
        self._answered_unsent = 0
        self._answered_writing = 0
        self._window_open = asyncio.Event()
        self._window_open.set()
        self._outbound = pb.StreamResponse()
        self._outbound_ready = asyncio.Event()
        self._results_sent = 0
        # Chunks acked in the message being built, with when they were read.
        self._acked_unsent: list[tuple[Ledger, float]] = []
        self._first_result_written = False
        self.end_reason = pb.STREAM_END_REASON_UNSPECIFIED
        self.started_at = time.monotonic()
        self.last_message_at = self.started_at
        # When the message being written was handed to gRPC; None between writes.
        self.write_started_at: float | None = None
        self._reader: asyncio.Task[None] | None = None
        # Set once the call is being aborted from outside its handler.
        self.aborting = False
        # The task running the call's handler, for ending a call whose write is stuck.
        self.handler_task: asyncio.Task[Any] | None = None
        # Chunks read while the window was full: the client sent beyond its credit.
        self.window_overruns = 0
        # True while the reader waits for window room, so the stream is not read.
        self._waiting_for_window = False
        # Audio pace: when the first audio chunk was read, the media seconds
        # read since, the smallest wall-minus-media offset, and the last read.
        self._audio_started_at: float | None = None
        self._audio_read_s = 0.0
        self._audio_min_offset_s = math.inf
        self._audio_read_at = 0.0
        # Called for each chunk read; returns False when the client's key is
        # over its chunk rate.
        self.admit_chunk: Callable[[], bool] | None = None
        # The rate-limited client as the RATE_LIMITED message names it.
        self.rate_limited_client = "this client's API key"
        # Tracing: the call span's context when it records, and the sampled
        # chunks without an ack or error yet, by (modality, sequence number).
        self._tracing: Any = None
        self._trace_parent: Any = None
        self._traces: dict[tuple[int, int], ChunkTrace] = {}
        self._log_chunks = executor.config.log_chunks

    def trace_with(self, tracing: Any, parent: Any) -> None:
        """Give a sample of this stream's chunks stage spans under ``parent``, the call span's context."""
        if parent is not None and tracing.chunk_sample_ratio > 0:
            self._tracing = tracing
            self._trace_parent = parent

    # -- config -------------------------------------------------------------

    def _validate_formats(self, config: pb.StreamConfig) -> None:
        audio = config.audio_format
        if config.HasField("audio_format"):
            if audio.encoding == pb.AUDIO_ENCODING_UNSPECIFIED:
                raise InvalidArgument(
                    "config.audio_format.encoding is unspecified: set AUDIO_ENCODING_LINEAR16 or AUDIO_ENCODING_FLOAT32"
                )
            if audio.encoding not in pb.AudioEncoding.values():
                raise InvalidArgument(
                    f"config.audio_format.encoding = {audio.encoding} is not an AudioEncoding this server knows: "
                    "set AUDIO_ENCODING_LINEAR16 or AUDIO_ENCODING_FLOAT32"
                )
            if not MIN_SAMPLE_RATE_HERTZ <= audio.sample_rate_hertz <= MAX_SAMPLE_RATE_HERTZ:
                raise InvalidArgument(
                    f"config.audio_format.sample_rate_hertz = {audio.sample_rate_hertz} is invalid: expected "
                    f"{MIN_SAMPLE_RATE_HERTZ} to {MAX_SAMPLE_RATE_HERTZ} Hz, for example 16000"
                )
            if not 0 <= audio.audio_channel_count <= MAX_AUDIO_CHANNELS:
                raise InvalidArgument(
                    f"config.audio_format.audio_channel_count = {audio.audio_channel_count} is invalid: "
                    f"expected 1 to {MAX_AUDIO_CHANNELS} (0 means 1)"
                )
        video = config.video_format
        if config.HasField("video_format"):
            if video.encoding == pb.IMAGE_ENCODING_UNSPECIFIED:
                raise InvalidArgument(
                    "config.video_format.encoding is unspecified: set IMAGE_ENCODING_JPEG, _PNG, _RAW_RGB24 or _RAW_BGR24"
                )
            if video.encoding not in pb.ImageEncoding.values():
                raise InvalidArgument(
                    f"config.video_format.encoding = {video.encoding} is not an ImageEncoding this server knows: "
                    "set IMAGE_ENCODING_JPEG, _PNG, _RAW_RGB24 or _RAW_BGR24"
                )
            if video.encoding in (pb.IMAGE_ENCODING_RAW_RGB24, pb.IMAGE_ENCODING_RAW_BGR24):
                limit = self._limits.max_frame_dimension
                for field in ("width", "height"):
                    value = getattr(video, field)
                    if not 1 <= value <= limit:
                        raise InvalidArgument(
                            f"config.video_format.{field} = {value} is invalid: raw frames need 1 to {limit} pixels"
                        )

    def _resolve_models(self, config: pb.StreamConfig) -> list[pb.ModelSelection]:
        if not config.models:
            raise InvalidArgument(
                f"config.models is empty: name at least one model; served models: {', '.join(self._executor.runners)}"
            )
        resolved = []
        seen = set()
        for index, selection in enumerate(config.models):
            runner = self._executor.runners.get(selection.model)
            if runner is None:
                raise NotFound(
                    f"config.models[{index}].model = {selection.model!r} is not served; "
                    f"served models: {', '.join(self._executor.runners)}"
                )
            modality = runner.model.info.modality
            if selection.modality not in (pb.MODALITY_UNSPECIFIED, modality):
                raise InvalidArgument(
                    f"config.models[{index}].modality = {_enum_name(pb.Modality, selection.modality)} does not match model "
                    f"{selection.model!r}, which reads {pb.Modality.Name(modality)}"
                )
            if selection.model in seen:
                raise InvalidArgument(f"config.models[{index}].model = {selection.model!r} is listed twice")
            seen.add(selection.model)
            if modality == pb.MODALITY_AUDIO and not config.HasField("audio_format"):
                raise InvalidArgument(
                    f"config.audio_format is missing: audio model {selection.model!r} needs the encoding and sample rate"
                )
            if modality == pb.MODALITY_VIDEO and not config.HasField("video_format"):
                raise InvalidArgument(
                    f"config.video_format is missing: video model {selection.model!r} needs the image encoding"
                )
            resolved.append(pb.ModelSelection(model=selection.model, modality=modality))
        return resolved

    def accepted_message(self) -> pb.StreamResponse:
        limits = self._limits
        return pb.StreamResponse(
            session_accepted=pb.SessionAccepted(
                stream_id=self.stream_id,
                limits=pb.StreamLimits(
                    max_audio_chunk_bytes=limits.max_audio_chunk_bytes,
                    max_frame_bytes=limits.max_frame_bytes,
                    max_frame_dimension=limits.max_frame_dimension,
                    max_text_chunk_bytes=limits.max_text_chunk_bytes,
                    max_chunks_in_flight=limits.max_chunks_in_flight,
                    max_pending_frames=limits.max_pending_frames,
                    chunk_latency_budget=_duration(self.budget_s),
                    idle_timeout=_duration(limits.idle_timeout_s),
                    max_stream_duration=_duration(limits.max_stream_duration_s),
                ),
                models=[
                    pb.ModelSelection(model=slot.name, modality=slot.modality)
                    for ledger in self._ledgers.values()
                    for slot in ledger.slots
                ],
            )
        )

    # -- reading --------------------------------------------------------------

    def start_reading(self, requests: AsyncIterator[pb.StreamRequest]) -> None:
        """Read the client's messages on a task of their own."""
        self._reader = asyncio.create_task(self.read(requests), name=f"reader-{self.stream_id}")
        self._reader.add_done_callback(_log_reader_failure)

    def end_by_server(self, reason: int) -> bool:
        """Stop reading, flush, answer every chunk read, then end with StreamEnd(reason).

        Returns False when the stream's input had already ended.
        """
        if self.phase is not StreamPhase.STREAMING or self.end_reason != pb.STREAM_END_REASON_UNSPECIFIED:
            return False
        logger.info("stream %s: ending it: %s", self.stream_id, pb.StreamEndReason.Name(reason))
        self.end_reason = reason
        if self._reader is not None:
            self._reader.cancel()
        # The flush job moves the phase on once its items are queued.
        self._executor.decode.submit(self._lane, self._flush_job_for(ends_input=True))
        return True

    async def read(self, requests: AsyncIterator[pb.StreamRequest]) -> None:
        """Consume the client's messages until the end of input."""
        try:
            async for request in requests:
                self.last_message_at = time.monotonic()
                kind = request.WhichOneof("request")
                if kind in _MODALITY_FIELDS:
                    await self._receive_chunk(_MODALITY_FIELDS[kind], getattr(request, kind))
                elif kind == "control":
                    action = request.control.action
                    if action == pb.CONTROL_ACTION_FLUSH:
                        self._executor.decode.submit(
                            self._lane, self._flush_job_for(ends_input=False, modality=request.control.modality)
                        )
                    elif action == pb.CONTROL_ACTION_END_OF_INPUT:
                        break
                    else:
                        raise InvalidArgument(
                            f"control.action = {action} is invalid: expected CONTROL_ACTION_FLUSH or CONTROL_ACTION_END_OF_INPUT"
                        )
                elif kind == "config":
                    raise FailedPrecondition("config was sent twice: only the first StreamRequest carries config")
                else:
                    raise InvalidArgument("StreamRequest is empty: set one of config, audio, frame, text, control")
            self.end_reason = pb.STREAM_END_REASON_INPUT_ENDED
            self._executor.decode.submit(self._lane, self._flush_job_for(ends_input=True))
        except StreaminferError as error:
            self.failure = error
            self._wake_writer()
        except grpc.aio.AbortError:
            # The server aborted the call from outside the handler, which cleans up.
            return
        except DecodeError as error:
            self.failure = InvalidArgument(
                f"a StreamRequest could not be parsed ({error}); send messages built from the streaminfer.v1 proto"
            )
            self._wake_writer()
        except Exception as error:
            logger.exception("stream %s: reading failed", self.stream_id)
            self.failure = StreaminferError(f"internal error while reading the stream: {type(error).__name__}")
            self._wake_writer()

    async def _receive_chunk(self, modality: int, chunk: Any) -> None:
        field = _MODALITY_NAMES[modality]
        sequence_number = chunk.sequence_number
        ledger = self._ledgers.get(modality)
        if ledger is not None:
            ledger.metric_received.inc()
        else:
            metrics.CHUNKS_RECEIVED.labels(metrics.modality_label(modality)).inc()

        # 1. Wait for room in the window. While waiting, this stream is not
        # read. Every chunk takes a place until its answer is written, a
        # rejected one too, so answers waiting to be written stay bounded.
        if self._in_flight - self._answered_writing >= self._limits.max_chunks_in_flight:
            # A client that keeps to its credit never sends this chunk yet. The
            # answers of the message being written count as returned credit:
            # the client may read them before this generator resumes.
            self.window_overruns += 1
            if self.window_overruns == 1:
                metrics.WINDOW_OVERRUNS.inc()
                logger.warning(
                    "stream %s: the client sent beyond its window of %d chunks in flight; "
                    "the server stops reading the stream until answers are written",
                    self.stream_id,
                    self._limits.max_chunks_in_flight,
                )
        self._waiting_for_window = True
        try:
            while self._in_flight >= self._limits.max_chunks_in_flight:
                self._window_open.clear()
                try:
                    await asyncio.wait_for(self._window_open.wait(), self._limits.stalled_window_flush_s)
                except TimeoutError:
                    self._flush_stalled_window()
        except asyncio.CancelledError:
            # The server ended the stream while this chunk waited: it was
            # read, so it is answered.
            self._in_flight += 1
            self._add_error(
                modality,
                sequence_number,
                pb.CHUNK_ERROR_REASON_SHUTDOWN,
                f"{field} chunk {sequence_number} was not processed: the server ended the stream; "
                "resend it on a new stream",
            )
            raise
        finally:
            self._waiting_for_window = False
        self._in_flight += 1

        # 2. Checks that need no decoding reply at once.
        problem = self._check_chunk(modality, field, chunk, ledger)
        if problem is not None:
            reason, message = problem
            self._add_error(modality, sequence_number, reason, message)
            if ledger is not None and reason != pb.CHUNK_ERROR_REASON_INVALID_ARGUMENT:
                ledger.last_sequence_number = sequence_number
            return
        assert ledger is not None

        if self.admit_chunk is not None and not self.admit_chunk():
            self._add_error(
                modality,
                sequence_number,
                pb.CHUNK_ERROR_REASON_RATE_LIMITED,
                f"{field} chunk {sequence_number} is over the chunk rate of {self.rate_limited_client}; "
                "send fewer chunks per second (larger chunks) or ask for a higher limit",
            )
            ledger.last_sequence_number = sequence_number
            return

        # 3. Into the ledger: the chunk is answered once its models are done.
        arrived = time.monotonic()
        deadline = self._deadline(arrived)
        ledger.pending.append(sequence_number)
        ledger.arrivals[sequence_number] = arrived
        ledger.last_sequence_number = sequence_number
        ledger.received += 1
        if modality == pb.MODALITY_AUDIO:
            self._track_audio_pace(len(chunk.audio_content), arrived)
        ticket = None
        if modality == pb.MODALITY_VIDEO and self._keep_latest_video:
            ticket = self._admit_frame(sequence_number)
        trace = None
        if self._trace_parent is not None and random.random() < self._tracing.chunk_sample_ratio:
            trace = ChunkTrace(metrics.modality_label(modality), sequence_number, arrived)
            self._traces[(modality, sequence_number)] = trace

        # 4. Decode, preprocess and queue for the models on this stream's
        # decode thread, so the loop goes on reading.
        client_time = chunk.timestamp.ToTimedelta().total_seconds() if chunk.HasField("timestamp") else None
        content = chunk.audio_content if modality == pb.MODALITY_AUDIO else (
            chunk.image_content if modality == pb.MODALITY_VIDEO else chunk.text
        )
        if self._log_chunks:
            logger.info(
                "stream %s: %s chunk %d read, %d bytes", self.stream_id, field, sequence_number, len(content),
                extra=logs.EVERY_TIME,
            )
        self._executor.decode.submit(
            self._lane,
            functools.partial(
                self._decode_job, ledger, content, sequence_number, client_time, arrived, deadline, ticket, trace
            ),
        )

    def _deadline(self, now: float) -> float:
        """Return the deadline of work started at ``now``: inf when the stream has no budget."""
        return now + self.budget_s if self.budget_s > 0 else math.inf

    def _track_audio_pace(self, size: int, now: float) -> None:
        """Count the media seconds of audio read, against the wall-clock time since the first audio chunk."""
        if self._audio_started_at is None:
            self._audio_started_at = now
        frame_bytes = (4 if self._config.audio_format.encoding == pb.AUDIO_ENCODING_FLOAT32 else 2) * self._audio_channels
        self._audio_read_s += size // frame_bytes / self._config.audio_format.sample_rate_hertz
        self._audio_min_offset_s = min(self._audio_min_offset_s, now - self._audio_started_at - self._audio_read_s)
        self._audio_read_at = now

    def audio_backlog_s(self, now: float) -> float | None:
        """Return how far the reading of this stream's audio is behind the pace the client set, in seconds.

        The pace is the earliest the client was ever ahead of real time. A
        client sending in real time keeps a steady offset between wall-clock
        time and media time read. A server that reads it late lets the offset grow. Returns None for a stream with no audio read in the last
        AUDIO_PACE_WINDOW_S, since a client that pauses would look late, and
        for a stream the server does not read because its window is full or
        its input has ended (the client ended it, or the server is ending
        the stream and no longer reads it).
        """
        if self._audio_started_at is None or now - self._audio_read_at > AUDIO_PACE_WINDOW_S:
            return None
        if self._waiting_for_window or self.end_reason != pb.STREAM_END_REASON_UNSPECIFIED:
            return None
        return max(0.0, now - self._audio_started_at - self._audio_read_s - self._audio_min_offset_s)

    def _admit_frame(self, sequence_number: int) -> FrameTicket:
        """Track a new frame; supersede the oldest waiting frames past max_pending_frames."""
        waiting = [ticket for ticket in self._frames.values() if not ticket.superseded]
        excess = len(waiting) + 1 - self._limits.max_pending_frames
        for ticket in waiting[: max(0, excess)]:
            ticket.supersede(
                f"frame {ticket.sequence_number} was dropped for newer frame {sequence_number}: the stream's video "
                f"fell behind its models (keep-latest, at most {self._limits.max_pending_frames} frames wait); "
                "send fewer frames per second or smaller frames"
            )
        ticket = self._frames[sequence_number] = FrameTicket(sequence_number)
        return ticket

    def _flush_stalled_window(self) -> None:
        # No chunk was acked or failed for a while with the window full, so
        # every chunk in flight may be waiting for input the window keeps out.
        # Unless the answers are there and the client is not taking them.
        if self._answered_unsent or self.write_started_at is not None:
            return
        logger.info(
            "stream %s: no chunk acked or failed for %.1f s with %d in flight; flushing buffered input",
            self.stream_id,
            self._limits.stalled_window_flush_s,
            self._in_flight,
        )
        self._executor.decode.submit(self._lane, self._flush_job_for(ends_input=False))

    def _decode_job(
        self,
        ledger: Ledger,
        content: bytes,
        sequence_number: int,
        client_time: float | None,
        arrived: float,
        deadline: float,
        ticket: FrameTicket | None,
        trace: ChunkTrace | None,
    ) -> None:
        """Decode one chunk and queue its model inputs. Runs on the stream's decode thread."""
        if self.closed:
            return
        if ticket is not None and ticket.superseded:
            self._call_on_loop(self._fail_chunks, ledger, [sequence_number], pb.CHUNK_ERROR_REASON_OVERFLOW, ticket.message)
            return
        started = time.monotonic()
        ledger.metric_decode_wait.observe(started - arrived)
        if started > deadline:
            # Stateful preprocessing still receives the chunk below, so the
            # stream's audio timeline stays whole. Only inference is skipped.
            deadline = -math.inf
        try:
            prepared = self._prepare(ledger, content, sequence_number, client_time)
        except ChunkRejected as rejection:
            self._call_on_loop(self._fail_chunks, ledger, [sequence_number], rejection.reason, rejection.message)
            return
        except Exception as error:
            # A bug in decoding. The chunk must still be failed: acks count
            # through sequence numbers, so a later ack would cover it.
            modality = _MODALITY_NAMES[ledger.modality]
            logger.exception("stream %s: decoding %s chunk %d failed", self.stream_id, modality, sequence_number)
            self._call_on_loop(
                self._fail_chunks,
                ledger,
                [sequence_number],
                pb.CHUNK_ERROR_REASON_DECODE_FAILED,
                f"the server failed to decode {modality} chunk {sequence_number} ({type(error).__name__}: {error}); "
                "the server logged the error, report it to its operator",
            )
            return
        finally:
            ended = time.monotonic()
            ledger.metric_decode.observe(ended - started)
            if trace is not None:
                trace.decode_started, trace.decode_ended = started, ended
        self._submit(ledger, prepared, deadline, ticket, trace, sequence_number)

    def _flush_job_for(self, ends_input: bool, modality: int = pb.MODALITY_UNSPECIFIED) -> Callable[[], None]:
        """Return a decode job that flushes the chunks received so far, of one modality or all.

        The last sequence numbers are read now, on the loop: by the time the
        job runs, the reader may have received later chunks, which must not
        count as flushed.
        """
        last_received = {
            ledger.modality: ledger.last_sequence_number
            for ledger in self._ledgers.values()
            if ledger.last_sequence_number is not None and modality in (pb.MODALITY_UNSPECIFIED, ledger.modality)
        }
        return functools.partial(self._flush_job, ends_input, last_received)

    def _flush_job(self, ends_input: bool, last_received: dict[int, int]) -> None:
        """Queue the models' buffered inputs. Runs on the stream's decode thread."""
        if self.closed:
            return
        deadline = self._deadline(time.monotonic())
        for modality, last_sequence_number in last_received.items():
            ledger = self._ledgers[modality]
            prepared = [
                (slot, slot.runner.model.flush(slot.preprocess_state, last_sequence_number)) for slot in ledger.slots
            ]
            self._submit(ledger, prepared, deadline)
        if ends_input:
            # Scheduled after the flushed items were submitted, so the loop
            # cannot see the stream as finished before their results arrive.
            self._call_on_loop(self._end_input)

    def _end_input(self) -> None:
        if self.phase is StreamPhase.STREAMING:
            self.phase = StreamPhase.INPUT_ENDED
        self._wake_writer()

    def _call_on_loop(self, callback: Callable[..., None], *args: Any) -> None:
        if not self.closed:
            self._loop.call_soon_threadsafe(callback, *args)

    def _check_chunk(
        self, modality: int, field: str, chunk: Any, ledger: Ledger | None
    ) -> tuple[int, str] | None:
        sequence_number = chunk.sequence_number
        if ledger is None:
            return (
                pb.CHUNK_ERROR_REASON_INVALID_ARGUMENT,
                f"{field} chunk {sequence_number} has no model: config.models names none for "
                f"{pb.Modality.Name(modality)}; add one or stop sending {field}",
            )
        if ledger.last_sequence_number is not None and sequence_number <= ledger.last_sequence_number:
            return (
                pb.CHUNK_ERROR_REASON_INVALID_ARGUMENT,
                f"{field}.sequence_number = {sequence_number} is not greater than the previous "
                f"{ledger.last_sequence_number}; number each modality's chunks in increasing order",
            )
        limits = self._limits
        remedy = "split it into smaller chunks"
        if modality == pb.MODALITY_AUDIO:
            size, limit, name = len(chunk.audio_content), limits.max_audio_chunk_bytes, "audio.audio_content"
        elif modality == pb.MODALITY_VIDEO:
            size, limit, name = len(chunk.image_content), limits.max_frame_bytes, "frame.image_content"
            remedy = "send a smaller image (lower resolution or JPEG quality)"
        else:
            size, limit, name = len(chunk.text), limits.max_text_chunk_bytes, "text.text"
        if size > limit:
            return (
                pb.CHUNK_ERROR_REASON_TOO_LARGE,
                f"{name} has {size} bytes, more than the limit of {limit}; {remedy}",
            )
        return None

    def _prepare(
        self, ledger: Ledger, content: bytes, sequence_number: int, client_time: float | None
    ) -> list[tuple[ModelSlot, list[ModelInput]]]:
        """Decode one chunk and run each model's preprocess. Runs on the stream's decode thread."""
        modality = ledger.modality
        if modality == pb.MODALITY_AUDIO:
            audio_format = self._config.audio_format
            samples = decode_audio(content, audio_format.encoding, self._audio_channels)
            start = self._audio_samples / audio_format.sample_rate_hertz
            self._audio_samples += len(samples)
            decoded = DecodedChunk(modality, sequence_number, samples, start, audio_format.sample_rate_hertz)
        elif modality == pb.MODALITY_VIDEO:
            image = decode_image(content, self._config.video_format, self._limits.max_frame_dimension)
            decoded = DecodedChunk(modality, sequence_number, image, client_time)
        else:
            decoded = DecodedChunk(modality, sequence_number, self._text_decoder.decode(content), client_time)

        prepared = []
        for slot in ledger.slots:
            try:
                inputs = slot.runner.model.preprocess(slot.preprocess_state, decoded)
            except ValueError as error:
                raise ChunkRejected(pb.CHUNK_ERROR_REASON_INVALID_ARGUMENT, f"{slot.name}: {error}") from error
            except Exception as error:
                logger.exception("stream %s: model %s failed to preprocess chunk %d", self.stream_id, slot.name, sequence_number)
                raise ChunkRejected(pb.CHUNK_ERROR_REASON_MODEL_FAILED, f"{slot.name} failed to preprocess: {error}") from error
            prepared.append((slot, inputs))
        return prepared

    def _submit(
        self,
        ledger: Ledger,
        prepared: Iterable[tuple[ModelSlot, list[ModelInput]]],
        deadline: float,
        ticket: FrameTicket | None = None,
        trace: ChunkTrace | None = None,
        sequence_number: int | None = None,
    ) -> None:
        """Queue model inputs on their runners. Runs on the stream's decode thread.

        ``sequence_number`` is the chunk the inputs come from; None for a flush.

        A full queue fails the chunks at once with OVERFLOW: nothing waits for
        room, so one stream's full model cannot stall the streams that share
        its decode thread.
        """
        for slot, inputs in prepared:
            self._count_input_wait(slot, inputs, sequence_number)
            if not inputs:
                continue
            items = []
            for offset, model_input in enumerate(inputs):
                items.append(
                    WorkItem(
                        owner=self,
                        slot=slot,
                        model_input=model_input,
                        index=slot.next_index + offset,
                        inference_state=slot.inference_state,
                        preprocess_state=slot.preprocess_state,
                        deadline=deadline,
                        priority=self.priority,
                        trace=trace,
                    )
                )
            if ticket is not None:
                ticket.items.extend(items)
            try:
                slot.runner.submit(items)
            except QueueFull as error:
                sequence_numbers = range(inputs[0].first_sequence_number, inputs[-1].last_sequence_number + 1)
                self._call_on_loop(
                    self._fail_chunks,
                    ledger,
                    sequence_numbers,
                    pb.CHUNK_ERROR_REASON_OVERFLOW,
                    f"{error}; slow down or retry later",
                    slot.name,
                )
                # NOTE: the model's preprocess state already contains this
                # chunk's leftovers, so the next window may start mid-chunk.
                completes = inputs[-1].completes_sequence_number
                if completes is not None:
                    self._call_on_loop(self._complete_through, slot, completes)
                continue
            slot.next_index += len(items)
            if ticket is not None and ticket.superseded:
                # Superseded while it was being submitted.
                ticket.supersede(ticket.message)

    @staticmethod
    def _count_input_wait(slot: ModelSlot, inputs: list[ModelInput], sequence_number: int | None) -> None:
        """Record how long each chunk these inputs complete waited for them. Runs on the decode thread."""
        now = time.monotonic()
        waiting = slot.awaiting_input
        if sequence_number is not None:
            waiting.append((sequence_number, now))
        completes = None
        for model_input in inputs:
            if model_input.completes_sequence_number is not None:
                completes = model_input.completes_sequence_number
        if completes is None:
            return
        while waiting and waiting[0][0] <= completes:
            _, decoded_at = waiting.popleft()
            slot.metric_input_wait.observe(now - decoded_at)

    # -- results --------------------------------------------------------------

    def on_items_done(self, slot: ModelSlot, items: list[WorkItem]) -> None:
        """Release finished items of one model in stream order. Runs on the event loop."""
        if self.closed:
            return
        for item in items:
            slot.done[item.index] = item
        ledger = self._ledgers[slot.modality]
        while slot.next_release in slot.done:
            item = slot.done.pop(slot.next_release)
            slot.next_release += 1
            model_input = item.model_input
            if isinstance(item.error, ItemDropped):
                self._fail_chunks(
                    ledger,
                    range(model_input.first_sequence_number, model_input.last_sequence_number + 1),
                    item.error.reason,
                    f"{slot.name}: {item.error.message}",
                    slot.name,
                )
            elif item.error is not None:
                self._fail_chunks(
                    ledger,
                    range(model_input.first_sequence_number, model_input.last_sequence_number + 1),
                    pb.CHUNK_ERROR_REASON_MODEL_FAILED,
                    f"{slot.name} failed: {type(item.error).__name__}: {item.error}",
                    slot.name,
                )
            else:
                if item.results:
                    for result in item.results:
                        result.model = slot.name
                        result.modality = slot.modality
                    self._outbound.results.extend(item.results)
                    self._results_sent += len(item.results)
                    slot.metric_results.inc(len(item.results))
            if model_input.completes_sequence_number is not None:
                slot.completed_through = max(slot.completed_through, model_input.completes_sequence_number)
        self._acknowledge(ledger)
        self._wake_writer()

    def _complete_through(self, slot: ModelSlot, sequence_number: int) -> None:
        slot.completed_through = max(slot.completed_through, sequence_number)
        self._acknowledge(self._ledgers[slot.modality])
        self._wake_writer()

    def _acknowledge(self, ledger: Ledger) -> None:
        complete_through = min(slot.completed_through for slot in ledger.slots)
        pending = ledger.pending
        ack: pb.ChunkAck | None = None
        acked = 0
        while pending and pending[0] <= complete_through:
            sequence_number = pending.popleft()
            if sequence_number in ledger.errored:
                ledger.errored.discard(sequence_number)
                ack = None
                continue
            self._answered(ledger.modality, sequence_number)
            self._acked_unsent.append((ledger, ledger.arrivals.pop(sequence_number)))
            ledger.acked += 1
            acked += 1
            if self._log_chunks:
                logger.info(
                    "stream %s: %s chunk %d acked", self.stream_id, _MODALITY_NAMES[ledger.modality], sequence_number,
                    extra=logs.EVERY_TIME,
                )
            if self._traces:
                self._emit_trace(ledger.modality, sequence_number)
            # A range joins consecutive numbers only: a number between two
            # acked chunks may belong to a chunk rejected before the ledger.
            if ack is None or sequence_number != ack.last_sequence_number + 1:
                ack = self._outbound.acks.add(modality=ledger.modality, first_sequence_number=sequence_number)
            ack.last_sequence_number = sequence_number
        if acked:
            ledger.metric_processed.inc(acked)

    def _fail_chunks(
        self, ledger: Ledger, sequence_numbers: Iterable[int], reason: int, message: str, model: str = ""
    ) -> None:
        """Report pending chunks as failed. Later acks skip them."""
        pending = set(ledger.pending)
        failed = 0
        for sequence_number in sequence_numbers:
            if sequence_number not in pending or sequence_number in ledger.errored:
                continue
            ledger.errored.add(sequence_number)
            ledger.arrivals.pop(sequence_number, None)
            ledger.failed += 1
            failed += 1
            if self._log_chunks:
                logger.info(
                    "stream %s: %s chunk %d failed: %s", self.stream_id, _MODALITY_NAMES[ledger.modality], sequence_number,
                    message, extra=logs.EVERY_TIME,
                )
            if self._traces:
                self._emit_trace(ledger.modality, sequence_number, metrics.reason_label(reason))
            self._answered(ledger.modality, sequence_number)
            self._outbound.errors.add(
                modality=ledger.modality, sequence_number=sequence_number, reason=reason, message=message, model=model
            )
        if failed:
            metrics.CHUNKS_DROPPED.labels(metrics.modality_label(ledger.modality), metrics.reason_label(reason)).inc(failed)
        self._acknowledge(ledger)
        self._wake_writer()

    def _emit_trace(self, modality: int, sequence_number: int, error: str | None = None) -> None:
        trace = self._traces.pop((modality, sequence_number), None)
        if trace is None:
            return
        try:
            self._tracing.emit(self._trace_parent, trace, self.stream_id, time.monotonic(), error)
        except Exception:
            # A tracing failure must not stop the chunk's ack or error from being sent.
            logger.exception("stream %s: recording the spans of chunk %d failed", self.stream_id, sequence_number)

    def _add_error(self, modality: int, sequence_number: int, reason: int, message: str) -> None:
        """Report a chunk that never entered the ledger as failed. It keeps its window place until written."""
        self._answered_unsent += 1
        ledger = self._ledgers.get(modality)
        if ledger is not None:
            ledger.received += 1
            ledger.failed += 1
        metrics.CHUNKS_DROPPED.labels(metrics.modality_label(modality), metrics.reason_label(reason)).inc()
        if self._log_chunks:
            logger.info(
                "stream %s: %s chunk %d failed: %s", self.stream_id, _MODALITY_NAMES.get(modality, "?"), sequence_number,
                message, extra=logs.EVERY_TIME,
            )
        self._outbound.errors.add(modality=modality, sequence_number=sequence_number, reason=reason, message=message)
        self._wake_writer()

    def _answered(self, modality: int, sequence_number: int) -> None:
        """Count a chunk answered in the message being built; its credit returns once that is written."""
        self._answered_unsent += 1
        if modality == pb.MODALITY_VIDEO:
            self._frames.pop(sequence_number, None)

    def _release_window(self, count: int) -> None:
        self._in_flight -= count
        self._window_open.set()

    # -- writing --------------------------------------------------------------

    def _wake_writer(self) -> None:
        self._outbound_ready.set()

    def is_idle(self, now: float, timeout_s: float) -> bool:
        """True when the stream is open and read nothing for ``timeout_s`` while the server was reading it."""
        return (
            self.phase is StreamPhase.STREAMING
            and not self._waiting_for_window
            and now - self.last_message_at > timeout_s
        )

    @property
    def finished(self) -> bool:
        """True when input ended and every chunk has an ack or an error."""
        if self.phase is not StreamPhase.INPUT_ENDED:
            return False
        return all(not ledger.pending and all(slot.idle for slot in ledger.slots) for ledger in self._ledgers.values())

    async def responses(self) -> AsyncIterator[pb.StreamResponse]:
        """Yield outbound messages until the stream is finished or failed."""
        while True:
            outbound = self._outbound
            pending = bool(outbound.results or outbound.acks or outbound.errors)
            if not pending and not self.finished and self.failure is None:
                await self._outbound_ready.wait()
                self._outbound_ready.clear()
                continue
            if self.failure is not None:
                return
            if pending:
                # Results that arrive while this message is being written go
                # into the next one, and the loop checks again before ending.
                self._outbound = pb.StreamResponse()
                answered, self._answered_unsent = self._answered_unsent, 0
                acked, self._acked_unsent = self._acked_unsent, []
                started = self.write_started_at = time.monotonic()
                self._answered_writing = answered
                yield outbound
                self._answered_writing = 0
                self.write_started_at = None
                self._count_written(outbound, acked, started)
                if answered:
                    self._release_window(answered)
                continue
            self.write_started_at = time.monotonic()
            yield pb.StreamResponse(stream_end=self._totals())
            self.write_started_at = None
            return

    def _count_written(self, message: pb.StreamResponse, acked: list[tuple[Ledger, float]], started: float) -> None:
        """Record a written message: its write time, its chunks' latency, the stream's first result."""
        now = time.monotonic()
        metrics.WRITE.observe(now - started)
        for ledger, arrived in acked:
            for slot in ledger.slots:
                slot.metric_latency.observe(now - arrived)
        if message.results and not self._first_result_written:
            self._first_result_written = True
            metrics.TIME_TO_FIRST_RESULT.observe(now - self.started_at)

    @property
    def in_flight(self) -> int:
        """Chunks read and not yet answered in a written message."""
        return self._in_flight

    @property
    def waiting_for_window(self) -> bool:
        """True while the reader waits for window room, so the stream is not read."""
        return self._waiting_for_window

    def _totals(self) -> pb.StreamEnd:
        return pb.StreamEnd(
            totals=[
                pb.ModalityTotals(
                    modality=ledger.modality,
                    chunks_received=ledger.received,
                    chunks_acked=ledger.acked,
                    chunks_failed=ledger.failed,
                )
                for ledger in self._ledgers.values()
            ],
            results_sent=self._results_sent,
            reason=self.end_reason,
        )

    def close(self) -> None:
        """Free the stream: queued items are dropped and states released."""
        if self.phase is StreamPhase.CLOSED:
            return
        self.phase = StreamPhase.CLOSED
        self.closed = True
        if self._reader is not None:
            self._reader.cancel()
        self._frames.clear()
        for ledger in self._ledgers.values():
            for slot in ledger.slots:
                slot.done.clear()
                slot.preprocess_state = None
                slot.inference_state = None
        self._window_open.set()


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def _log_reader_failure(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        logger.error("stream reader failed", exc_info=error)


def _enum_name(enum_type: Any, value: int) -> str:
    """Return the name of an enum value, or the number when the value is not defined."""
    return enum_type.Name(value) if value in enum_type.values() else str(value)
