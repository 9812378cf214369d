"""Per-stream chunk accounting: sequence numbers, the in-flight window, latency.

The tracker is plain synchronous code with no I/O, so the session drives it
from its event loop and tests drive it directly.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math

from streaminfer.client._config import Modality

__all__ = ["ChunkTracker", "ModalityStats", "StreamStats", "percentile"]

logger = logging.getLogger(__name__)

FIRST_SEQUENCE_NUMBER = 1


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of ``values``; ``fraction`` is 0.5 for p50."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclasses.dataclass(slots=True)
class ModalityStats:
    """Counts and latencies of one modality's chunks."""

    sent: int = 0
    acked: int = 0
    failed: int = 0
    failures_by_reason: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    # Seconds from writing each answered chunk to reading its ChunkAck or
    # ChunkError; for a resent chunk, from its first write. NOTE: one float
    # per chunk is kept for the life of the stream.
    latencies_s: list[float] = dataclasses.field(default_factory=list)
    # Chunks written again on a new stream after a roll-over; ``sent`` counts
    # each chunk once.
    resent: int = 0

    @property
    def unanswered(self) -> int:
        return self.sent - self.acked - self.failed


@dataclasses.dataclass(slots=True)
class StreamStats:
    """Per-stream counts and latencies, for summaries and tests."""

    modalities: dict[Modality, ModalityStats] = dataclasses.field(default_factory=dict)
    results_by_model: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    # Acks or errors for chunks this client never sent or that were already
    # answered; the API promises exactly one answer per chunk, so this stays 0.
    unexpected_answers: int = 0
    # Times a session in roll-over mode went on in a new stream.
    rollovers: int = 0

    def modality(self, modality: Modality | str | int) -> ModalityStats:
        """Return the stats of ``modality``, added with zero counts when it has none yet.

        ``modality`` takes the forms ``Modality.parse`` accepts, for example
        ``"audio"``. Any other value raises ValueError.
        """
        selected = Modality.parse(modality)
        if selected not in self.modalities:
            self.modalities[selected] = ModalityStats()
        return self.modalities[selected]

    def latencies_s(self, modality: Modality | str | int | None = None) -> list[float]:
        """Return the per-chunk latencies of one modality, or of all when ``modality`` is None."""
        if modality is not None:
            return list(self.modality(modality).latencies_s)
        return [latency for stats in self.modalities.values() for latency in stats.latencies_s]


@dataclasses.dataclass(slots=True)
class _Outstanding:
    # None until the chunk is written; a reserved chunk may still be cancelled.
    sent_at: float | None = None


class ChunkTracker:
    """Assigns sequence numbers per modality and matches answers to chunks.

    ``max_in_flight`` chunks, over all modalities, may be reserved and not yet
    answered; 0 means no limit. Times are seconds from one monotonic clock.
    """

    def __init__(self, max_in_flight: int) -> None:
        if max_in_flight < 0:
            raise ValueError(f"max_in_flight = {max_in_flight!r} is invalid: expected 0 (no limit) or more")
        self.max_in_flight = max_in_flight
        self.stats = StreamStats()
        self._next_sequence_number: dict[Modality, int] = {}
        # Per modality, in sequence-number order because numbers only grow.
        self._outstanding: dict[Modality, dict[int, _Outstanding]] = {}
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def has_credit(self) -> bool:
        """True when one more chunk fits in the window."""
        return self.max_in_flight == 0 or self._in_flight < self.max_in_flight

    def reserve(self, modality: Modality) -> int:
        """Take a window slot and the modality's next sequence number.

        Raises RuntimeError when the window is full; callers wait for
        ``has_credit`` first.
        """
        if not self.has_credit:
            raise RuntimeError(f"in-flight window is full: {self._in_flight} of {self.max_in_flight} chunks")
        sequence_number = self._next_sequence_number.get(modality, FIRST_SEQUENCE_NUMBER)
        self._next_sequence_number[modality] = sequence_number + 1
        self._outstanding.setdefault(modality, {})[sequence_number] = _Outstanding()
        self._in_flight += 1
        return sequence_number

    def cancel(self, modality: Modality, sequence_number: int) -> None:
        """Give back the slot of a reserved chunk that was never written.

        Its sequence number is not reused, which the API allows because numbers
        need only increase.
        """
        outstanding = self._outstanding.get(modality, {})
        if outstanding.pop(sequence_number, None) is not None:
            self._in_flight -= 1

    def mark_sent(self, modality: Modality, sequence_number: int, now: float) -> None:
        """Record that the chunk is being written at ``now``."""
        self._outstanding[modality][sequence_number].sent_at = now
        self.stats.modality(modality).sent += 1

    def mark_resent(self, modality: Modality, sequence_number: int) -> None:
        """Count an unanswered chunk written again on a new stream; its latency still runs from the first write."""
        if not self.is_written(modality, sequence_number):
            raise KeyError(f"{modality.label} chunk {sequence_number} is not written and unanswered")
        self.stats.modality(modality).resent += 1

    def is_written(self, modality: Modality, sequence_number: int) -> bool:
        """True when the chunk was written and has no answer yet."""
        chunk = self._outstanding.get(modality, {}).get(sequence_number)
        return chunk is not None and chunk.sent_at is not None

    def unanswered(self) -> list[tuple[Modality, int]]:
        """Return the written chunks without an answer, by modality and then sequence number."""
        return [
            (modality, number)
            for modality in sorted(self._outstanding)
            for number, chunk in self._outstanding[modality].items()
            if chunk.sent_at is not None
        ]

    def ack(self, modality: Modality, first: int, last: int, now: float) -> list[tuple[int, float]]:
        """Settle the chunks in ``[first, last]``; return (sequence number, latency) pairs.

        The range may span sequence numbers this client skipped after a
        cancelled send; those have nothing to settle.
        """
        outstanding = self._outstanding.get(modality, {})
        covered = [number for number in outstanding if first <= number <= last]
        settled = []
        stats = self.stats.modality(modality)
        for number in covered:
            chunk = outstanding[number]
            if chunk.sent_at is None:
                # An answer to a chunk not yet written cannot be ours.
                continue
            del outstanding[number]
            self._in_flight -= 1
            latency = now - chunk.sent_at
            stats.acked += 1
            stats.latencies_s.append(latency)
            settled.append((number, latency))
        if not settled:
            self._count_unexpected("ack", modality, f"{first}-{last}")
        return settled

    def fail(self, modality: Modality, sequence_number: int, reason: str, now: float) -> float | None:
        """Settle one rejected or dropped chunk; return its latency, or None if it was not ours."""
        outstanding = self._outstanding.get(modality, {})
        chunk = outstanding.get(sequence_number)
        if chunk is None or chunk.sent_at is None:
            self._count_unexpected("error", modality, str(sequence_number))
            return None
        del outstanding[sequence_number]
        self._in_flight -= 1
        latency = now - chunk.sent_at
        stats = self.stats.modality(modality)
        stats.failed += 1
        stats.failures_by_reason[reason] += 1
        stats.latencies_s.append(latency)
        return latency

    def outstanding(self, modality: Modality) -> list[int]:
        """Return the sequence numbers of the modality's chunks not yet answered."""
        return list(self._outstanding.get(modality, {}))

    def _count_unexpected(self, kind: str, modality: Modality, numbers: str) -> None:
        self.stats.unexpected_answers += 1
        # The first one is logged; later ones are only counted.
        if self.stats.unexpected_answers == 1:
            logger.warning(
                "server sent an %s for %s chunk(s) %s that are not outstanding; later ones are only counted",
                kind,
                modality.label,
                numbers,
            )
