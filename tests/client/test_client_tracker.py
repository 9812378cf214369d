"""ChunkTracker: sequence numbers per modality, the window, latency, stats."""

from __future__ import annotations

import math
import re

import pytest

from streaminfer.client import Modality, percentile
from streaminfer.client._tracker import ChunkTracker


def _send(tracker: ChunkTracker, modality: Modality, now: float) -> int:
    number = tracker.reserve(modality)
    tracker.mark_sent(modality, number, now)
    return number


def test_sequence_numbers_per_modality() -> None:
    tracker = ChunkTracker(max_in_flight=0)

    audio = [_send(tracker, Modality.AUDIO, 0.0) for _ in range(3)]
    video = [_send(tracker, Modality.VIDEO, 0.0) for _ in range(2)]
    audio.append(_send(tracker, Modality.AUDIO, 0.0))
    text = [_send(tracker, Modality.TEXT, 0.0)]

    assert audio == [1, 2, 3, 4]
    assert video == [1, 2]
    assert text == [1]


def test_window_credit() -> None:
    tracker = ChunkTracker(max_in_flight=2)

    _send(tracker, Modality.AUDIO, 0.0)
    _send(tracker, Modality.VIDEO, 0.0)

    assert tracker.in_flight == 2
    assert not tracker.has_credit
    with pytest.raises(RuntimeError, match="window is full"):
        tracker.reserve(Modality.AUDIO)

    tracker.ack(Modality.VIDEO, 1, 1, 1.0)

    assert tracker.in_flight == 1
    assert tracker.has_credit


def test_window_zero_is_unlimited() -> None:
    tracker = ChunkTracker(max_in_flight=0)

    for _ in range(1000):
        _send(tracker, Modality.AUDIO, 0.0)

    assert tracker.has_credit


def test_ack_range_latencies() -> None:
    tracker = ChunkTracker(max_in_flight=10)
    for now in (1.0, 1.5, 2.0):
        _send(tracker, Modality.AUDIO, now)

    settled = tracker.ack(Modality.AUDIO, 1, 2, 3.0)

    assert settled == [(1, 2.0), (2, 1.5)]
    assert tracker.outstanding(Modality.AUDIO) == [3]
    stats = tracker.stats.modality(Modality.AUDIO)
    assert (stats.sent, stats.acked, stats.failed, stats.unanswered) == (3, 2, 0, 1)
    assert stats.latencies_s == [2.0, 1.5]


def test_stats_modality_by_name_or_number() -> None:
    tracker = ChunkTracker(max_in_flight=10)
    _send(tracker, Modality.AUDIO, 1.0)
    tracker.ack(Modality.AUDIO, 1, 1, 1.5)

    stats = tracker.stats
    assert stats.modality("audio") is stats.modality(Modality.AUDIO)
    assert stats.modality("AUDIO") is stats.modality(Modality.AUDIO)
    assert stats.modality(int(Modality.AUDIO)) is stats.modality(Modality.AUDIO)
    assert stats.modality("audio").sent == 1
    assert stats.latencies_s("audio") == [0.5]
    assert list(stats.modalities) == [Modality.AUDIO]


@pytest.mark.parametrize("value", ["sound", "", 9, None])
def test_stats_modality_rejects_unknown(value: object) -> None:
    stats = ChunkTracker(max_in_flight=10).stats

    with pytest.raises(ValueError, match=f"^modality {re.escape(repr(value))} is invalid: expected audio, video or text"):
        stats.modality(value)  # type: ignore[arg-type]

    assert stats.modalities == {}


def test_fail_settles_chunk() -> None:
    tracker = ChunkTracker(max_in_flight=10)
    _send(tracker, Modality.TEXT, 1.0)
    _send(tracker, Modality.TEXT, 1.0)

    latency = tracker.fail(Modality.TEXT, 2, "DECODE_FAILED", 1.25)

    assert latency == 0.25
    stats = tracker.stats.modality(Modality.TEXT)
    assert stats.failed == 1
    assert stats.failures_by_reason == {"DECODE_FAILED": 1}
    assert tracker.outstanding(Modality.TEXT) == [1]


def test_ack_skips_already_failed_chunk() -> None:
    tracker = ChunkTracker(max_in_flight=10)
    for _ in range(3):
        _send(tracker, Modality.VIDEO, 0.0)
    tracker.fail(Modality.VIDEO, 2, "DEADLINE", 0.5)

    settled = tracker.ack(Modality.VIDEO, 1, 3, 1.0)

    assert [number for number, _ in settled] == [1, 3]
    assert tracker.stats.unexpected_answers == 0
    assert tracker.in_flight == 0


def test_unexpected_answers_counted(caplog: pytest.LogCaptureFixture) -> None:
    tracker = ChunkTracker(max_in_flight=10)
    _send(tracker, Modality.AUDIO, 0.0)
    tracker.ack(Modality.AUDIO, 1, 1, 1.0)

    assert tracker.ack(Modality.AUDIO, 1, 1, 2.0) == []
    assert tracker.fail(Modality.VIDEO, 7, "DEADLINE", 2.0) is None
    assert tracker.stats.unexpected_answers == 2
    assert tracker.stats.modality(Modality.AUDIO).acked == 1
    assert len([record for record in caplog.records if "not outstanding" in record.message]) == 1


def test_cancel_returns_credit_not_number() -> None:
    tracker = ChunkTracker(max_in_flight=1)
    number = tracker.reserve(Modality.AUDIO)

    tracker.cancel(Modality.AUDIO, number)

    assert tracker.has_credit
    assert tracker.stats.modality(Modality.AUDIO).sent == 0
    assert tracker.reserve(Modality.AUDIO) == number + 1


def test_ack_ignores_reserved_unwritten_chunk() -> None:
    tracker = ChunkTracker(max_in_flight=3)
    tracker.reserve(Modality.AUDIO)

    assert tracker.ack(Modality.AUDIO, 1, 1, 1.0) == []
    assert tracker.in_flight == 1


def test_percentile_nearest_rank() -> None:
    values = [float(value) for value in range(1, 101)]

    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
    assert math.isnan(percentile([], 0.5))


def test_stats_latencies_all_modalities() -> None:
    tracker = ChunkTracker(max_in_flight=0)
    _send(tracker, Modality.AUDIO, 0.0)
    _send(tracker, Modality.VIDEO, 0.0)
    tracker.ack(Modality.AUDIO, 1, 1, 0.1)
    tracker.ack(Modality.VIDEO, 1, 1, 0.3)

    assert sorted(tracker.stats.latencies_s()) == pytest.approx([0.1, 0.3])
    assert tracker.stats.latencies_s(Modality.VIDEO) == pytest.approx([0.3])
