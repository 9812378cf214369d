"""Silero VAD over a real Stream call agrees with Silero's own offline segmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio
from silero_vad import get_speech_timestamps, load_silero_vad

from conftest import MEDIA
from streamutil import audio_requests, read_wav, run_stream, vad_config
from streaminfer.v1 import streaminfer_pb2 as pb

TOLERANCE_S = 0.1
RECORDINGS = ["Front_Center.wav", "Front_Left.wav", "Front_Right.wav", "Side_Left.wav", "speech_sample.wav"]


def offline_segments(samples: np.ndarray, rate: int) -> list[tuple[float, float]]:
    audio = torch.from_numpy(samples.astype(np.float32) / 32768.0)
    audio = torchaudio.functional.resample(audio, rate, 16_000)
    stamps = get_speech_timestamps(audio, load_silero_vad(), sampling_rate=16_000, return_seconds=False)
    return [(stamp["start"] / 16_000, stamp["end"] / 16_000) for stamp in stamps]


@pytest.mark.parametrize("name", RECORDINGS)
def test_vad_matches_offline(channel, name: str) -> None:
    samples, rate = read_wav(MEDIA / "audio" / name)
    requests = audio_requests(samples, rate)

    outcome = run_stream(channel, vad_config(rate), requests)

    expected = offline_segments(samples, rate)
    found = outcome.speech_segments()
    assert len(found) == len(expected), f"streamed {found}, offline {expected}"
    for (start, end), (expected_start, expected_end) in zip(found, expected):
        assert abs(start - expected_start) <= TOLERANCE_S, f"start {start:.3f} vs offline {expected_start:.3f}"
        assert abs(end - expected_end) <= TOLERANCE_S, f"end {end:.3f} vs offline {expected_end:.3f}"
    assert outcome.answered(pb.MODALITY_AUDIO) == list(range(len(requests)))
    assert outcome.end is not None
    assert outcome.end.totals[0].chunks_acked == len(requests)


def test_vad_segments_at_inserted_speech(channel) -> None:
    speech, rate = read_wav(MEDIA / "audio" / "Front_Center.wav")
    silence = np.zeros(rate * 2, dtype="<i2")
    samples = np.concatenate([silence, speech, silence, speech, silence])
    speech_s = len(speech) / rate
    inserted = [(2.0, 2.0 + speech_s), (4.0 + speech_s, 4.0 + 2 * speech_s)]

    outcome = run_stream(channel, vad_config(rate), audio_requests(samples, rate, chunk_ms=20))

    segments = outcome.speech_segments()
    assert segments, "no speech found"
    for start, end in segments:
        assert any(low - TOLERANCE_S <= start and end <= high + TOLERANCE_S for low, high in inserted), (
            f"segment {start:.2f}-{end:.2f} s lies outside the inserted speech {inserted}"
        )
    for low, high in inserted:
        assert any(low - TOLERANCE_S <= start <= high for start, _ in segments), f"no segment starts in {low:.2f}-{high:.2f} s"


def test_vad_interim_results_cover_every_window(channel) -> None:
    samples, rate = read_wav(MEDIA / "audio" / "Front_Center.wav")
    outcome = run_stream(channel, vad_config(rate, interim=True), audio_requests(samples, rate))

    interim = [result for result in outcome.results if not result.is_final]
    assert interim, "interim_results was set but no interim result came"
    probabilities = [result.speech.speech_probability for result in interim]
    assert all(0.0 <= p <= 1.0 for p in probabilities)
    assert max(probabilities) > 0.8
    assert min(probabilities) < 0.2
    windows = int(len(samples) / rate * 16_000) // 512
    assert abs(len(interim) - windows) <= 1
