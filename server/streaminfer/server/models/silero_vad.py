"""Silero VAD batched across streams, with each stream's model state kept outside the model.

Audio of any sample rate is resampled to 16 kHz per stream and cut into 512-sample
(32 ms) windows. One work item holds the windows one chunk completes, and a
batch runs the first window of every stream in one forward pass, then the
second, and so on. Each stream keeps its own LSTM state and the last 64
samples of its previous window, which Silero's own wrapper keeps inside the
module and so cannot batch across streams.

Speech segments follow ``silero_vad.get_speech_timestamps`` (silero-vad 6.2.3)
with its defaults: a window with probability >= 0.5 starts speech; speech ends
at the first window below 0.35 that is followed by 100 ms in which no window
reaches 0.5; segments of 250 ms or less are dropped; kept segments are padded
by 30 ms on each side. ``max_speech_duration_s`` is not supported (it is
infinite by default there too).

Design of the streamed events: a segment shorter than the minimum speech
duration must never be announced, and an announcement cannot be taken back.
So SPEECH_START is sent once the open segment has lasted more than 250 ms
without a pending silence, which is the first moment at which the offline
algorithm would surely keep it. Its ``start_time`` is still the true (padded)
onset, so it arrives about 250 ms after that onset. SPEECH_END follows once
100 ms of silence confirm the end, or at a flush. Interim ACTIVITY results,
when the stream requests them, carry each window's probability as soon as it
exists.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from streaminfer.server import metrics
from streaminfer.server.config import ModelConfig
from streaminfer.server.models.base import DecodedChunk, Model, ModelInfo, ModelInput, StreamOptions, set_duration
from streaminfer.v1 import streaminfer_pb2 as pb

logger = logging.getLogger(__name__)

SAMPLE_RATE_HERTZ = 16_000
WINDOW_SAMPLES = 512
CONTEXT_SAMPLES = 64
# One stream's LSTM state: (layers, hidden size); batches stack it on axis 1.
LSTM_STATE_SHAPE = (2, 128)

# get_speech_timestamps defaults, in 16 kHz samples where they are durations.
THRESHOLD = 0.5
NEGATIVE_THRESHOLD = THRESHOLD - 0.15
MIN_SILENCE_SAMPLES = SAMPLE_RATE_HERTZ * 100 // 1000
SPEECH_PAD_SAMPLES = SAMPLE_RATE_HERTZ * 30 // 1000
MIN_SPEECH_SAMPLES = SAMPLE_RATE_HERTZ * 250 // 1000


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


class StreamingResampler:
    """Resamples one stream chunk by chunk, giving the same samples as resampling it whole.

    The filter is torchaudio's windowed-sinc kernel (``torchaudio.transforms.Resample``,
    read through ``kernel_for``), and the output equals
    ``torchaudio.functional.resample`` of the whole signal up to float32
    rounding. The kernel is applied here with numpy because the stream's
    history has to be kept here anyway, and because calling the torch
    transform per 32 ms chunk costs more in call overhead. A timing loop on a
    2-core x86 machine measured 30 against 58 us per chunk at 48 kHz, and 21
    against 111 us at 44.1 kHz.

    To make chunk edges seamless it keeps ``width`` input samples of history
    and holds back the newest input until enough later input arrives to
    compute the outputs that depend on it. That delay is at most
    ``width + orig`` input samples, where ``orig`` is the input rate divided
    by the greatest common divisor of the two rates: 22 samples (0.46 ms) at
    48 kHz.

    NOTE: ``finish`` computes the held-back tail as if the audio ended there,
    as offline resampling does at the end of a file. After a mid-stream flush
    the next input starts a new segment, so the output has a small edge effect
    at each flush point.
    """

    def __init__(
        self, input_rate_hertz: int, output_rate_hertz: int, kernel: np.ndarray | None = None, width: int = 0
    ) -> None:
        divisor = math.gcd(input_rate_hertz, output_rate_hertz)
        self._orig = input_rate_hertz // divisor
        self._new = output_rate_hertz // divisor
        # kernel[k, phase] is the weight of input sample k of a frame's span
        # for output ``phase`` of that frame. The span starts ``width`` samples
        # before the frame.
        self._kernel = kernel
        self._width = width
        self._buffer = np.zeros(width, dtype=np.float32)
        self._segment_inputs = 0
        self._segment_outputs = 0
        self._segment_base = 0

    @staticmethod
    def kernel_for(input_rate_hertz: int, output_rate_hertz: int) -> tuple[np.ndarray, int]:
        """Return torchaudio's resampling kernel as a (span, phases) array, and its half-width."""
        import torchaudio

        transform = torchaudio.transforms.Resample(input_rate_hertz, output_rate_hertz, dtype=torch.float32)
        return transform.kernel[:, 0, :].numpy().T.copy(), transform.width

    @property
    def end_position(self) -> int:
        """Output-rate index of the end of all input pushed so far, from the stream start."""
        return self._segment_base + _ceil_div(self._segment_inputs * self._new, self._orig)

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Add input samples and return the output samples that are now final."""
        self._segment_inputs += len(samples)
        if self._kernel is None:
            return samples
        self._buffer = np.concatenate((self._buffer, samples))
        return self._run()

    def finish(self) -> np.ndarray:
        """Return the held-back output, computed as if the input ended here, and start a new segment."""
        output = np.zeros(0, dtype=np.float32)
        if self._kernel is not None:
            # Offline resampling pads the end with width + orig zeros.
            self._buffer = np.concatenate((self._buffer, np.zeros(self._width + self._orig, dtype=np.float32)))
            remaining = _ceil_div(self._segment_inputs * self._new, self._orig) - self._segment_outputs
            output = self._run()[: max(remaining, 0)]
        self._segment_base = self.end_position
        self._segment_inputs = 0
        self._segment_outputs = 0
        self._buffer = np.zeros(self._width, dtype=np.float32)
        return output

    def _run(self) -> np.ndarray:
        # 1. Output frame f reads the buffer from f * orig for span samples.
        span = self._kernel.shape[0]
        if len(self._buffer) < span:
            return np.zeros(0, dtype=np.float32)
        windows = np.lib.stride_tricks.sliding_window_view(self._buffer, span)[:: self._orig]

        # 2. Each frame gives ``new`` outputs, in time order.
        output = (windows @ self._kernel).reshape(-1)
        self._buffer = self._buffer[len(windows) * self._orig :]
        self._segment_outputs += len(output)
        return output


@dataclasses.dataclass(slots=True)
class _ChunkSpan:
    sequence_number: int
    # Exclusive end of the chunk's samples, as a window-rate index from the stream start.
    end: int


class AudioWindower:
    """Cuts one stream's samples into fixed windows and tracks which chunks each window contains.

    Callers register each chunk with the index at which its samples end,
    then push samples, which may arrive later than their chunk (as from a
    resampler that keeps some back). A chunk is complete once the window that
    contains its last sample is cut. Windows come back as ModelInput items whose
    ``data`` is the float32 window.
    """

    def __init__(self, window_samples: int, sample_rate_hertz: int) -> None:
        self.window_samples = window_samples
        self.sample_rate_hertz = sample_rate_hertz
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0
        self._chunks: collections.deque[_ChunkSpan] = collections.deque()
        # End of the last completed chunk, which is where the next pending chunk starts.
        self._completed_end = 0

    @property
    def position(self) -> int:
        """Index just after the last sample pushed."""
        return self._buffer_start + len(self._buffer)

    def add_chunk(self, sequence_number: int, end: int) -> None:
        self._chunks.append(_ChunkSpan(sequence_number, end))

    def push(self, samples: np.ndarray) -> list[ModelInput]:
        """Buffer samples and return every full window, plus an item for chunks left with nothing to wait for."""
        block, spans, leftover = self.push_block(samples)
        items = []
        for row, (start, end, first, last, completed) in enumerate(spans):
            items.append(
                ModelInput(block[row], first, last, completed, start / self.sample_rate_hertz, end / self.sample_rate_hertz)
            )
        if leftover is not None:
            first, completed = leftover
            items.append(ModelInput(None, first, completed, completed))
        return items

    def push_block(
        self, samples: np.ndarray
    ) -> tuple[np.ndarray | None, list[tuple[int, int, int, int, int | None]], tuple[int, int] | None]:
        """Buffer samples and cut every full window at once.

        Returns three things. The windows are the rows of one
        (windows, window_samples) array, or None when no window is full. Each
        row has a span: start, end, first and last sequence number, and the
        last chunk it completes or None. The last is (first, last) sequence
        number of the chunks complete with no window of their own, or None.
        """
        if len(samples):
            self._buffer = np.concatenate((self._buffer, samples)) if len(self._buffer) else samples
        count = len(self._buffer) // self.window_samples
        block = None
        spans = []
        if count:
            cut = count * self.window_samples
            block = self._buffer[:cut].reshape(count, self.window_samples)
            self._buffer = self._buffer[cut:]
            for _ in range(count):
                spans.append(self._cut_span(self.window_samples))

        # A chunk with no samples of its own (empty, or fewer input samples
        # than one output sample) may already be complete.
        leftover = None
        if self._chunks and self._chunks[0].end <= self._buffer_start:
            first = self._chunks[0].sequence_number
            leftover = (first, self._pop_completed(self._buffer_start))
        return block, spans, leftover

    def flush(self, last_sequence_number: int) -> ModelInput:
        """Return the partial window padded with zeros, or a None-data item when nothing is buffered.

        Either way the item completes every chunk through ``last_sequence_number``.
        """
        real_samples = len(self._buffer)
        if real_samples == 0:
            self._chunks.clear()
            self._completed_end = self._buffer_start
            time = self._buffer_start / self.sample_rate_hertz
            return ModelInput(None, last_sequence_number, last_sequence_number, last_sequence_number, time, time)
        window = np.zeros(self.window_samples, dtype=np.float32)
        window[:real_samples] = self._buffer
        self._buffer = np.zeros(0, dtype=np.float32)
        item = self._cut(window, real_samples)
        self._chunks.clear()
        self._completed_end = self._buffer_start
        item.last_sequence_number = max(item.last_sequence_number, last_sequence_number)
        item.completes_sequence_number = last_sequence_number
        return item

    def _cut(self, window: np.ndarray, real_samples: int) -> ModelInput:
        start, end, first, last, completed = self._cut_span(real_samples)
        return ModelInput(window, first, last, completed, start / self.sample_rate_hertz, end / self.sample_rate_hertz)

    def _cut_span(self, real_samples: int) -> tuple[int, int, int, int, int | None]:
        """Advance past the next window; return its start, end, first and last chunk, and the last chunk it completes."""
        start = self._buffer_start
        end = start + real_samples
        self._buffer_start = end

        # 1. The window contains every chunk that starts before its end. Its
        # samples all belong to registered chunks, so the first one is pending.
        first = last = self._chunks[0].sequence_number
        chunk_start = self._completed_end
        for span in self._chunks:
            if chunk_start >= end:
                break
            last = span.sequence_number
            chunk_start = span.end

        # 2. Chunks whose last sample is in this window are now complete.
        completed = self._pop_completed(end)
        if completed is not None and completed > last:
            last = completed
        return start, end, first, last, completed

    def _pop_completed(self, end: int) -> int | None:
        completed = None
        while self._chunks and self._chunks[0].end <= end:
            span = self._chunks.popleft()
            completed = span.sequence_number
            self._completed_end = span.end
        return completed


@dataclasses.dataclass(slots=True)
class VadWindow:
    """One 512-sample window's place: its 16 kHz span and the chunks it contains."""

    # 16 kHz indices from the stream start; ``end`` counts real samples only,
    # so it is short of ``start + 512`` for a window padded at a flush.
    start: int
    end: int
    first_sequence_number: int
    last_sequence_number: int


@dataclasses.dataclass(slots=True)
class VadInput:
    """One VAD work item: every window one chunk (or a flush) completed, for one stream.

    A stateful model takes one item per stream per batch. With all of a
    chunk's windows in one item, one batch runs them all, one forward pass per
    window position for every stream in the batch. At real-time pace a chunk
    brings about one window; a chunk of many windows costs one batch, not one
    batch per window.
    """

    # (windows, 512) float32, or None when the item has no window.
    samples: np.ndarray | None
    windows: list[VadWindow]
    # Set when the item ends the open segment (a flush or the end of input):
    # where it ends, and the chunks the closing result covers.
    closing: VadWindow | None = None

    @property
    def closes_segment(self) -> bool:
        return self.closing is not None


@dataclasses.dataclass(slots=True)
class VadPreprocessState:
    options: StreamOptions
    resampler: StreamingResampler | None = None
    windower: AudioWindower = dataclasses.field(
        default_factory=lambda: AudioWindower(WINDOW_SAMPLES, SAMPLE_RATE_HERTZ)
    )
    input_rate_hertz: int = 0


@dataclasses.dataclass(slots=True)
class _OpenSegment:
    # 16 kHz index of the first window at or above the threshold.
    start: int
    first_sequence_number: int
    speech_probability_sum: float = 0.0
    speech_windows: int = 0
    # Start of a silence that may end the segment, with its windows' probabilities
    # kept apart until the silence is confirmed or speech resumes.
    silence_start: int | None = None
    silence_probability_sum: float = 0.0
    silence_windows: int = 0
    announced: bool = False


@dataclasses.dataclass(slots=True)
class VadStreamState:
    """One stream's model state and speech-segment state machine."""

    # Kept as numpy arrays on the host: gathering and scattering them costs no
    # torch calls, each of which would hand the GIL to the busy event loop.
    lstm_state: np.ndarray
    context: np.ndarray
    segment: _OpenSegment | None = None
    # Padded end of the last segment, in 16 kHz samples. The next segment's padded start is clamped to it.
    previous_segment_end: int = 0
    previous_window_first_sequence_number: int | None = None


def join_arrays(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate contiguous float32 arrays into a new, writable flat array, holding the GIL throughout.

    numpy lets go of the GIL while it copies a large array. Taking it back
    waits for the thread that has it, and a busy event loop lets go only at
    its next wait or after the 5 ms switch interval. Measured: np.concatenate
    of 256 rows of 8,192 samples took 0.6 ms alone and 137 ms beside a busy
    Python thread, and bytearray.join, which keeps the GIL, 0.5 ms in both.
    """
    return np.frombuffer(bytearray().join(parts), dtype=np.float32)


class _WindowStepper(torch.nn.Module):
    """Runs Silero's inner model over every window position of a batch in one TorchScript call.

    A Python loop over the positions makes several torch calls per position,
    and each one gives up the GIL and must take it back. With the event loop
    busy, taking it back waits for the loop to yield, up to the interpreter's
    5 ms switch interval, and a batch of 32 positions was measured 11 times
    slower beside a busy Python thread. Scripted, the whole loop runs with
    the GIL released.

    ``x`` has one row per stream: its 64-sample context, then its windows.
    Rows are sorted by window count (``counts``), longest first, so the rows
    still running at position t are always the first ones.
    """

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.window = WINDOW_SAMPLES
        self.span = CONTEXT_SAMPLES + WINDOW_SAMPLES

    def forward(self, x: torch.Tensor, state: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        steps = counts[0]
        probabilities = torch.zeros(x.shape[0], steps, device=x.device)
        active = x.shape[0]
        for step in range(steps):
            while counts[active - 1] <= step:
                active -= 1
            offset = step * self.window
            window = x[:active, offset : offset + self.span].contiguous()
            step_probabilities, new_state = self.inner(window, state[:, :active].contiguous())
            state[:, :active] = new_state
            probabilities[:active, step] = step_probabilities[:, 0]
        return probabilities, state


class SileroVadModel(Model):
    """Silero VAD v6, 16 kHz, one stateful stream per batch row."""

    def __init__(self, config: ModelConfig) -> None:
        self.info = ModelInfo(
            name=config.name,
            modality=pb.MODALITY_AUDIO,
            description=config.description
            or "Silero VAD v6 voice activity detection: speech segments and per-32 ms speech probability, any input rate",
            stateful=True,
        )
        self._device = torch.device("cpu")
        self._inner: Any = None
        self._stepper: Any = None
        # Resampling kernels and their half-widths by input rate, shared by streams.
        self._kernels: dict[int, tuple[np.ndarray, int]] = {}
        self._kernels_lock = threading.Lock()

    def load(self, device: str) -> None:
        # silero_vad sets torch's intra-op threads to 1 when imported. The
        # server sizes that pool itself, so undo it.
        threads = torch.get_num_threads()
        import silero_vad

        torch.set_num_threads(threads)
        # Fail at start-up, not at the first stream, if torchaudio cannot load.
        self._kernels[48_000] = StreamingResampler.kernel_for(48_000, SAMPLE_RATE_HERTZ)
        self._device = torch.device(device)
        self._inner = silero_vad.load_silero_vad()._model.to(self._device)
        self._inner.eval()
        self._stepper = torch.jit.script(_WindowStepper(self._inner))
        logger.info("silero_vad %s loaded on %s", getattr(silero_vad, "__version__", "?"), device)

    def new_preprocess_state(self, options: StreamOptions) -> VadPreprocessState:
        return VadPreprocessState(options)

    def new_inference_state(self, options: StreamOptions) -> VadStreamState:
        return VadStreamState(
            lstm_state=np.zeros(LSTM_STATE_SHAPE, dtype=np.float32),
            context=np.zeros(CONTEXT_SAMPLES, dtype=np.float32),
        )

    # -- preprocess (decode pool) ---------------------------------------------

    def preprocess(self, state: VadPreprocessState, chunk: DecodedChunk) -> list[ModelInput]:
        samples = np.asarray(chunk.data, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"audio samples have shape {samples.shape}, expected a 1-D array of mono samples")
        resampler = self._resampler_for(state, chunk.sample_rate_hertz or state.options.audio_sample_rate_hertz)

        output = resampler.push(samples)
        state.windower.add_chunk(chunk.sequence_number, resampler.end_position)
        block, spans, leftover = state.windower.push_block(output)
        if block is None:
            if leftover is None:
                return []
            # Only completes chunks: no inference.
            first, completed = leftover
            return [ModelInput(None, first, completed, completed)]
        # One item for all the windows this chunk completed (see VadInput).
        windows = [VadWindow(start, end, first, last) for start, end, first, last, _ in spans]
        last = windows[-1].last_sequence_number
        # The last chunk completed: by the leftover item, else by the last window that completes one.
        completes = next((span[4] for span in reversed(spans) if span[4] is not None), None)
        if leftover is not None:
            last = max(last, leftover[1])
            completes = leftover[1]
        return [
            ModelInput(
                VadInput(block, windows),
                windows[0].first_sequence_number,
                last,
                completes,
                windows[0].start / SAMPLE_RATE_HERTZ,
                windows[-1].end / SAMPLE_RATE_HERTZ,
            )
        ]

    def flush(self, state: VadPreprocessState, last_sequence_number: int) -> list[ModelInput]:
        pieces = []
        if state.resampler is not None:
            pieces = state.windower.push(state.resampler.finish())
        closing = state.windower.flush(last_sequence_number)
        return _as_vad_inputs([*pieces, closing], closing=closing)

    def _resampler_for(self, state: VadPreprocessState, rate: int) -> StreamingResampler:
        if rate <= 0:
            raise ValueError(f"sample_rate_hertz = {rate} is invalid: expected a positive rate")
        if state.resampler is not None:
            if rate != state.input_rate_hertz:
                raise ValueError(
                    f"sample_rate_hertz = {rate} differs from the stream's {state.input_rate_hertz}; "
                    "a stream keeps one sample rate"
                )
            return state.resampler
        kernel, width = None, 0
        if rate != SAMPLE_RATE_HERTZ:
            with self._kernels_lock:
                cached = rate in self._kernels
                if not cached:
                    self._kernels[rate] = StreamingResampler.kernel_for(rate, SAMPLE_RATE_HERTZ)
                kernel, width = self._kernels[rate]
            metrics.CACHE_REQUESTS.labels(self.info.name, "resampler_kernel", "hit" if cached else "miss").inc()
        state.input_rate_hertz = rate
        state.resampler = StreamingResampler(rate, SAMPLE_RATE_HERTZ, kernel, width)
        return state.resampler

    # -- inference (worker thread) --------------------------------------------

    def run_batch(self, inputs: Sequence[ModelInput], states: Sequence[VadStreamState]) -> list[Any]:
        outputs: list[np.ndarray | None] = [None] * len(inputs)
        rows = [index for index, item in enumerate(inputs) if item.data.samples is not None]
        if not rows:
            return outputs

        # 1. Gather, in numpy so the batch crosses into torch once and the
        # worker hands the GIL back only a few times per batch. Rows are
        # sorted by window count, longest first, so the streams still running
        # at step t are always the first rows. Each row is the stream's
        # 64-sample context followed by all its windows.
        rows.sort(key=lambda index: -len(inputs[index].data.samples))
        counts = [len(inputs[index].data.samples) for index in rows]
        steps = counts[0]
        padding = np.zeros((steps - counts[-1]) * WINDOW_SAMPLES, dtype=np.float32)
        parts = []
        for row, index in enumerate(rows):
            parts.append(states[index].context)
            parts.append(inputs[index].data.samples.reshape(-1))
            if counts[row] < steps:
                parts.append(padding[: (steps - counts[row]) * WINDOW_SAMPLES])
        x = join_arrays(parts).reshape(len(rows), CONTEXT_SAMPLES + steps * WINDOW_SAMPLES)
        lstm_state = torch.from_numpy(np.stack([states[index].lstm_state for index in rows], axis=1)).to(self._device)

        # 2. One forward pass per window position for every stream with a
        # window there, all in one TorchScript call (see _WindowStepper).
        step_probabilities, lstm_state = self._stepper(torch.from_numpy(x).to(self._device), lstm_state, counts)
        probabilities = step_probabilities.cpu().numpy()
        final_state = lstm_state.cpu().numpy()

        # 3. Scatter: copies, so one stream's state does not keep the batch alive.
        for row, index in enumerate(rows):
            end = CONTEXT_SAMPLES + counts[row] * WINDOW_SAMPLES
            states[index].lstm_state = final_state[:, row].copy()
            states[index].context = x[row, end - CONTEXT_SAMPLES : end].copy()
            outputs[index] = probabilities[row, : counts[row]]
        return outputs

    def postprocess(
        self, state: VadStreamState, item: ModelInput, output: np.ndarray | None, options: StreamOptions
    ) -> list[pb.StreamResult]:
        data: VadInput = item.data
        results: list[pb.StreamResult] = []
        if output is not None:
            for window, probability in zip(data.windows, output.tolist()):
                if options.interim_results:
                    activity = _result(window, pb.SPEECH_EVENT_TYPE_ACTIVITY, probability, is_final=False)
                    set_duration(activity.start_time, window.start / SAMPLE_RATE_HERTZ)
                    set_duration(activity.end_time, window.end / SAMPLE_RATE_HERTZ)
                    results.append(activity)
                self._advance(state, window, probability, results)
                state.previous_window_first_sequence_number = window.first_sequence_number
        if data.closing is not None and state.segment is not None:
            # As offline at the end of the audio: the segment runs to the last sample.
            self._close(state, data.closing, data.closing.end, include_silence=True, results=results)
        return results

    def _advance(
        self, state: VadStreamState, window: VadWindow, probability: float, results: list[pb.StreamResult]
    ) -> None:
        """Feed one window's probability to the segment state machine."""
        segment = state.segment
        if segment is None:
            if probability >= THRESHOLD:
                first = window.first_sequence_number
                if window.start > 0 and state.previous_window_first_sequence_number is not None:
                    # The 30 ms pad reaches into the previous window's chunks.
                    first = state.previous_window_first_sequence_number
                state.segment = _OpenSegment(window.start, first, probability, 1)
                self._announce_if_long(state, window, results)
            return

        if probability >= THRESHOLD and segment.silence_start is not None:
            segment.speech_probability_sum += segment.silence_probability_sum
            segment.speech_windows += segment.silence_windows
            segment.silence_start = None
            segment.silence_probability_sum = 0.0
            segment.silence_windows = 0

        if probability < NEGATIVE_THRESHOLD and segment.silence_start is None:
            segment.silence_start = window.start

        if segment.silence_start is None:
            segment.speech_probability_sum += probability
            segment.speech_windows += 1
        else:
            segment.silence_probability_sum += probability
            segment.silence_windows += 1

        # Offline, only a window below the negative threshold can end speech.
        if probability < NEGATIVE_THRESHOLD and window.start - segment.silence_start >= MIN_SILENCE_SAMPLES:
            self._close(state, window, segment.silence_start, include_silence=False, results=results)
            return
        self._announce_if_long(state, window, results)

    def _announce_if_long(
        self, state: VadStreamState, window: VadWindow, results: list[pb.StreamResult]
    ) -> None:
        # Without a pending silence the segment cannot end before this
        # window's end, so past the minimum here it will be kept.
        segment = state.segment
        if segment.announced or segment.silence_start is not None or window.end - segment.start <= MIN_SPEECH_SAMPLES:
            return
        results.append(self._start_result(state, window))
        segment.announced = True

    def _start_result(self, state: VadStreamState, window: VadWindow) -> pb.StreamResult:
        segment = state.segment
        result = _result(window, pb.SPEECH_EVENT_TYPE_SPEECH_START, segment.speech_probability_sum / segment.speech_windows)
        result.first_sequence_number = segment.first_sequence_number
        set_duration(result.start_time, self._padded_start(state) / SAMPLE_RATE_HERTZ)
        return result

    def _padded_start(self, state: VadStreamState) -> int:
        return max(state.segment.start - SPEECH_PAD_SAMPLES, state.previous_segment_end, 0)

    def _close(
        self, state: VadStreamState, window: VadWindow, end: int, include_silence: bool, results: list[pb.StreamResult]
    ) -> None:
        segment = state.segment
        if end - segment.start > MIN_SPEECH_SAMPLES:
            if not segment.announced:
                results.append(self._start_result(state, window))
            probability_sum = segment.speech_probability_sum
            windows = segment.speech_windows
            if include_silence:
                probability_sum += segment.silence_probability_sum
                windows += segment.silence_windows
            # A flush closes at the last real sample, which no pad may pass.
            padded_end = end if include_silence else end + SPEECH_PAD_SAMPLES
            result = _result(window, pb.SPEECH_EVENT_TYPE_SPEECH_END, probability_sum / max(windows, 1))
            result.first_sequence_number = segment.first_sequence_number
            set_duration(result.start_time, self._padded_start(state) / SAMPLE_RATE_HERTZ)
            set_duration(result.end_time, padded_end / SAMPLE_RATE_HERTZ)
            results.append(result)
            state.previous_segment_end = padded_end
        state.segment = None


def _result(window: VadWindow, event_type: int, probability: float, is_final: bool = True) -> pb.StreamResult:
    return pb.StreamResult(
        first_sequence_number=window.first_sequence_number,
        last_sequence_number=window.last_sequence_number,
        is_final=is_final,
        speech=pb.SpeechSegment(event_type=event_type, speech_probability=probability),
    )


def _window_of(piece: ModelInput) -> VadWindow:
    return VadWindow(
        round((piece.start_time or 0.0) * SAMPLE_RATE_HERTZ),
        round((piece.end_time or 0.0) * SAMPLE_RATE_HERTZ),
        piece.first_sequence_number,
        piece.last_sequence_number,
    )


def _as_vad_inputs(pieces: list[ModelInput], closing: ModelInput | None = None) -> list[ModelInput]:
    """Merge the windower's windows and completions into one work item.

    ``closing`` is the windower's flush item, the last of ``pieces``, which
    also ends the open segment.
    """
    with_samples = [piece for piece in pieces if piece.data is not None]
    if not with_samples and closing is None:
        return pieces
    if len(pieces) == 1:
        # The usual case at real-time pace: one window, or only a flush.
        (piece,) = pieces
        piece.data = VadInput(
            None if piece.data is None else piece.data[np.newaxis],
            [_window_of(piece)] if piece.data is not None else [],
            _window_of(closing) if closing is not None else None,
        )
        return pieces
    completed = [piece.completes_sequence_number for piece in pieces if piece.completes_sequence_number is not None]
    item = ModelInput(
        VadInput(
            np.stack([piece.data for piece in with_samples]) if with_samples else None,
            [_window_of(piece) for piece in with_samples],
            _window_of(closing) if closing is not None else None,
        ),
        pieces[0].first_sequence_number,
        max(piece.last_sequence_number for piece in pieces),
        completed[-1] if completed else None,
        pieces[0].start_time,
        pieces[-1].end_time,
    )
    return [item]
