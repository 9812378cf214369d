"""Silero VAD model: streamed chunk by chunk, checked against silero_vad's own offline functions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torchaudio

import silero_vad
from streaminfer.server.models.base import DecodedChunk, Model, ModelInput, StreamOptions
from streaminfer.server.models.silero_vad import StreamingResampler
from streaminfer.v1 import streaminfer_pb2 as pb

from model_testing import MEDIA, SHORT_WAVS, load_model, read_wav

ALL_WAVS = [*SHORT_WAVS, MEDIA / "audio" / "speech_sample.wav"]
START = pb.SPEECH_EVENT_TYPE_SPEECH_START
END = pb.SPEECH_EVENT_TYPE_SPEECH_END
ACTIVITY = pb.SPEECH_EVENT_TYPE_ACTIVITY
TOLERANCE_S = 0.1


@dataclasses.dataclass
class StreamRun:
    items: list[ModelInput]
    # (item, its results), in the order the executor would release them.
    outputs: list[tuple[ModelInput, list[pb.StreamResult]]]
    probabilities: list[float]

    def results(self, event_type: int) -> list[pb.StreamResult]:
        return [result for _, results in self.outputs for result in results if result.speech.event_type == event_type]

    def segments(self) -> list[tuple[float, float]]:
        return [(seconds(result.start_time), seconds(result.end_time)) for result in self.results(END)]


def seconds(duration) -> float:
    return duration.ToNanoseconds() / 1e9


class Stream:
    """One stream's states, driven the way the executor drives them."""

    def __init__(self, model: Model, rate: int, interim: bool = False) -> None:
        self.model = model
        self.rate = rate
        self.options = StreamOptions("test", interim, rate)
        self.preprocess_state = model.new_preprocess_state(self.options)
        self.inference_state = model.new_inference_state(self.options)
        self.run = StreamRun([], [], [])
        self.next_sequence_number = 0
        self.samples_sent = 0

    def send(self, samples: np.ndarray) -> list[ModelInput]:
        chunk = DecodedChunk(
            pb.MODALITY_AUDIO, self.next_sequence_number, samples, self.samples_sent / self.rate, self.rate
        )
        self.next_sequence_number += 1
        self.samples_sent += len(samples)
        return self.model.preprocess(self.preprocess_state, chunk)

    def flush(self) -> list[ModelInput]:
        return self.model.flush(self.preprocess_state, self.next_sequence_number - 1)

    def finish_items(self, items: list[ModelInput], outputs: list[float | None]) -> None:
        for item, output in zip(items, outputs):
            self.run.items.append(item)
            if item.data is None:
                self.run.outputs.append((item, []))
                continue
            if output is not None:
                self.run.probabilities.extend(output.tolist())
            self.run.outputs.append((item, self.model.postprocess(self.inference_state, item, output, self.options)))


def run_alone(model: Model, stream: Stream, items: list[ModelInput]) -> None:
    for item in items:
        outputs = [None]
        if item.data is not None:
            with torch.inference_mode():
                outputs = model.run_batch([item], [stream.inference_state])
        stream.finish_items([item], outputs)


def stream_audio(
    model: Model, samples: np.ndarray, rate: int, chunk_samples: int, interim: bool = False
) -> StreamRun:
    stream = Stream(model, rate, interim)
    for offset in range(0, len(samples), chunk_samples):
        run_alone(model, stream, stream.send(samples[offset : offset + chunk_samples]))
    run_alone(model, stream, stream.flush())
    return stream.run


def offline_segments(reference: torch.nn.Module, samples: np.ndarray, rate: int) -> list[tuple[float, float]]:
    audio = torchaudio.functional.resample(torch.from_numpy(samples), rate, 16000)
    stamps = silero_vad.get_speech_timestamps(audio, reference)
    return [(stamp["start"] / 16000, stamp["end"] / 16000) for stamp in stamps]


def assert_segments_close(streamed: list[tuple[float, float]], offline: list[tuple[float, float]]) -> None:
    assert len(streamed) == len(offline), f"streamed {streamed} vs offline {offline}"
    for (start, end), (offline_start, offline_end) in zip(streamed, offline):
        assert abs(start - offline_start) <= TOLERANCE_S, f"start {start} vs offline {offline_start}"
        assert abs(end - offline_end) <= TOLERANCE_S, f"end {end} vs offline {offline_end}"


@pytest.fixture(scope="module")
def vad() -> Model:
    return load_model("silero_vad")


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return silero_vad.load_silero_vad()


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_resampler_matches_whole_signal(rate: int) -> None:
    rng = np.random.default_rng(rate)
    signal = (rng.standard_normal(rate) * 0.1).astype(np.float32)
    expected = torchaudio.functional.resample(torch.from_numpy(signal), rate, 16000).numpy()
    resampler = StreamingResampler(rate, 16000, *StreamingResampler.kernel_for(rate, 16000))

    pieces = []
    offset = 0
    for size in [0, 1, 7, *rng.integers(0, 2000, 40).tolist()]:
        pieces.append(resampler.push(signal[offset : offset + size]))
        offset += size
    pieces.append(resampler.push(signal[offset:]))
    pieces.append(resampler.finish())
    streamed = np.concatenate(pieces)

    assert len(streamed) == len(expected)
    assert resampler.end_position == len(expected)
    np.testing.assert_allclose(streamed, expected, atol=1e-5)


def test_probabilities_match_reference(vad: Model, reference: torch.nn.Module) -> None:
    samples, rate = read_wav(MEDIA / "audio" / "speech_sample.wav")
    run = stream_audio(vad, samples, rate, chunk_samples=rate * 20 // 1000)

    audio = torchaudio.functional.resample(torch.from_numpy(samples), rate, 16000)
    with torch.inference_mode():
        expected = reference.audio_forward(audio, 16000)[0].numpy()
    assert len(run.probabilities) == len(expected)
    np.testing.assert_allclose(run.probabilities, expected, atol=1e-4)


@pytest.mark.parametrize("path", ALL_WAVS, ids=lambda path: path.name)
def test_segments_match_offline(vad: Model, reference: torch.nn.Module, path) -> None:
    samples, rate = read_wav(path)
    assert rate == 48000
    run = stream_audio(vad, samples, rate, chunk_samples=rate * 32 // 1000)

    offline = offline_segments(reference, samples, rate)
    assert offline, "the recording should contain speech"
    assert_segments_close(run.segments(), offline)
    assert len(run.results(START)) == len(run.results(END))
    for result in run.results(END):
        assert result.is_final
        assert 0.5 < result.speech.speech_probability <= 1.0


def test_segments_in_padded_recording(vad: Model, reference: torch.nn.Module) -> None:
    speech, rate = read_wav(MEDIA / "audio" / "Front_Center.wav")
    before, after = 1.0, 1.5
    samples = np.concatenate(
        [np.zeros(int(before * rate), np.float32), speech, np.zeros(int(after * rate), np.float32)]
    )
    run = stream_audio(vad, samples, rate, chunk_samples=rate * 32 // 1000)

    expected = [(start + before, end + before) for start, end in offline_segments(reference, speech, rate)]
    assert_segments_close(run.segments(), expected)
    speech_end = before + len(speech) / rate
    for start, end in run.segments():
        assert start >= before - 0.05
        assert end <= speech_end + 0.05


def test_silence_has_no_segments(vad: Model) -> None:
    run = stream_audio(vad, np.zeros(48000 * 2, np.float32), 48000, chunk_samples=1536)
    assert run.results(START) == []
    assert run.results(END) == []
    assert max(run.probabilities) < 0.35
    assert run.items[-1].completes_sequence_number == 62


def test_start_waits_for_min_speech(vad: Model) -> None:
    samples, rate = read_wav(MEDIA / "audio" / "speech_sample.wav")
    run = stream_audio(vad, samples, rate, chunk_samples=1536)

    starts = [(item, result) for item, results in run.outputs for result in results if result.speech.event_type == START]
    assert len(starts) == 8
    for item, result in starts:
        onset = seconds(result.start_time) + 0.030
        assert item.end_time - onset > 0.25, "SPEECH_START before 250 ms of speech"
        assert item.end_time - onset < 0.25 + 0.2, "SPEECH_START much later than 250 ms of speech"


def test_flush_closes_open_segment(vad: Model, reference: torch.nn.Module) -> None:
    samples, rate = read_wav(MEDIA / "audio" / "Front_Center.wav")
    cut = samples[: int(1.1 * rate)]
    run = stream_audio(vad, cut, rate, chunk_samples=1536)

    assert_segments_close(run.segments(), offline_segments(reference, cut, rate))
    last = run.results(END)[-1]
    assert abs(seconds(last.end_time) - 1.1) < 0.001
    assert run.outputs[-1][1][-1] is last


def test_mid_stream_flush_keeps_timeline(vad: Model, reference: torch.nn.Module) -> None:
    samples, rate = read_wav(MEDIA / "audio" / "speech_sample.wav")
    stream = Stream(vad, rate)
    flush_after = 2.3
    for offset in range(0, len(samples), 1536):
        run_alone(vad, stream, stream.send(samples[offset : offset + 1536]))
        if offset < flush_after * rate <= offset + 1536:
            flushed = stream.flush()
            assert flushed[-1].completes_sequence_number == stream.next_sequence_number - 1
            run_alone(vad, stream, flushed)
    run_alone(vad, stream, stream.flush())

    # The flush falls in the pause after the second recording, so it only
    # ends the stream's resampler segment and no speech segment.
    assert_segments_close(stream.run.segments(), offline_segments(reference, samples, rate))
    completed = [item.completes_sequence_number for item in stream.run.items if item.completes_sequence_number is not None]
    assert completed == sorted(completed)
    assert completed[-1] == stream.next_sequence_number - 1


def test_chunk_completion(vad: Model) -> None:
    stream = Stream(vad, 16000)
    assert stream.send(np.zeros(100, np.float32)) == [], "a partial window completes nothing"
    (window,) = stream.send(np.zeros(412, np.float32))
    assert (window.first_sequence_number, window.last_sequence_number) == (0, 1)
    assert window.completes_sequence_number == 1
    assert (window.start_time, window.end_time) == (0.0, 0.032)

    (empty,) = stream.send(np.zeros(0, np.float32))
    assert empty.data is None
    assert empty.completes_sequence_number == 2

    assert stream.send(np.zeros(600, np.float32))[0].completes_sequence_number is None
    flushed = stream.flush()
    assert flushed[-1].completes_sequence_number == 3
    assert flushed[-1].data.closes_segment
    assert flushed[-1].end_time == pytest.approx((512 + 600) / 16000)


@pytest.mark.parametrize("rate, chunk_ms", [(44100, 10), (48000, 20), (8000, 50), (16000, 32)])
def test_chunk_accounting(vad: Model, rate: int, chunk_ms: int) -> None:
    speech, speech_rate = read_wav(MEDIA / "audio" / "Front_Left.wav")
    samples = torchaudio.functional.resample(torch.from_numpy(speech), speech_rate, rate).numpy()
    chunk_samples = rate * chunk_ms // 1000
    run = stream_audio(vad, samples, rate, chunk_samples)
    chunks = -(-len(samples) // chunk_samples)

    completed = [item.completes_sequence_number for item in run.items if item.completes_sequence_number is not None]
    assert completed == sorted(set(completed)), "completions must increase"
    assert completed[-1] == chunks - 1
    for item in run.items:
        assert item.first_sequence_number <= item.last_sequence_number
        if item.completes_sequence_number is not None:
            assert item.completes_sequence_number <= item.last_sequence_number
    windows = [item for item in run.items if item.data is not None and item.data.samples is not None]
    assert [item.first_sequence_number for item in windows] == sorted(item.first_sequence_number for item in windows)
    assert windows[-1].end_time == pytest.approx(len(samples) / rate, abs=1 / 16000)


def test_interim_activity(vad: Model) -> None:
    samples, rate = read_wav(MEDIA / "audio" / "Side_Left.wav")
    run = stream_audio(vad, samples, rate, chunk_samples=960, interim=True)

    activity = run.results(ACTIVITY)
    assert len(activity) == len(run.probabilities)
    assert [result.speech.speech_probability for result in activity] == pytest.approx(run.probabilities, abs=1e-6)
    assert not any(result.is_final for result in activity)
    assert max(run.probabilities) > 0.9
    assert len(run.results(END)) == 2


def test_batched_streams_equal_alone(vad: Model) -> None:
    rng = np.random.default_rng(1)
    recordings = []
    for index in range(16):
        samples, rate = read_wav(SHORT_WAVS[index % len(SHORT_WAVS)])
        lead = np.zeros(int(rng.integers(0, 8000)), np.float32)
        recordings.append(np.concatenate([lead, samples * np.float32(0.5 + index / 16)]))

    alone = [stream_audio(vad, samples, 48000, chunk_samples=1536) for samples in recordings]

    # All streams advance one chunk at a time; each step is one batch. Chunks
    # of one to four windows put items of different lengths in a batch.
    streams = [Stream(vad, 48000) for _ in recordings]
    chunk_sizes = [1536 * (1 + index % 4) for index in range(len(recordings))]
    largest_batch = 0
    window_counts = set()
    steps = max(len(samples) for samples in recordings) // 1536 + 1
    for step in range(steps + 1):
        pending = []
        for stream, samples, size in zip(streams, recordings, chunk_sizes):
            offset = step * size
            if offset < len(samples):
                pending.append((stream, stream.send(samples[offset : offset + size])))
            elif offset < len(samples) + size:
                pending.append((stream, stream.flush()))
        while any(items for _, items in pending):
            batch = [(stream, items.pop(0)) for stream, items in pending if items]
            runnable = [(stream, item) for stream, item in batch if item.data is not None]
            largest_batch = max(largest_batch, len(runnable))
            window_counts.update(len(item.data.windows) for _, item in runnable)
            with torch.inference_mode():
                outputs = vad.run_batch([item for _, item in runnable], [stream.inference_state for stream, _ in runnable])
            by_item = {id(item): output for (_, item), output in zip(runnable, outputs)}
            for stream, item in batch:
                stream.finish_items([item], [by_item.get(id(item))])

    assert window_counts >= {1, 2, 3, 4}
    assert largest_batch == 16
    for stream, single in zip(streams, alone):
        assert len(stream.run.probabilities) == len(single.probabilities)
        np.testing.assert_allclose(stream.run.probabilities, single.probabilities, atol=1e-5)
        assert stream.run.segments() == single.segments()


def test_sample_rate_change_rejected(vad: Model) -> None:
    stream = Stream(vad, 48000)
    stream.send(np.zeros(480, np.float32))
    chunk = DecodedChunk(pb.MODALITY_AUDIO, 5, np.zeros(160, np.float32), 0.01, 16000)
    with pytest.raises(ValueError, match="sample_rate_hertz = 16000"):
        vad.preprocess(stream.preprocess_state, chunk)


def test_join_arrays_copies_in_order():
    from streaminfer.server.models.silero_vad import join_arrays

    rng = np.random.default_rng(3)
    parts = [rng.standard_normal(size).astype(np.float32) for size in (64, 8192, 0, 512, 1)]
    joined = join_arrays(parts)
    np.testing.assert_array_equal(joined, np.concatenate(parts))
    assert joined.dtype == np.float32
    joined[0] = 7.0
    assert joined[0] == 7.0
    assert parts[0][0] != 7.0
