"""The requests a session in roll-over mode writes again when it goes on in a new stream."""

from __future__ import annotations

import collections
import itertools

from streaminfer.client._config import Modality
from streaminfer.v1 import streaminfer_pb2 as pb

__all__ = ["ChunkKey", "ResendLog"]

# (modality, sequence number) of one chunk.
ChunkKey = tuple[Modality, int]


class ResendLog:
    """Unanswered chunks and the flushes between them, in the order they were written.

    When the server ends a stream, it has answered every chunk it read, so the
    unanswered chunks are the last ones written and were never read. The log
    keeps their requests so that the next stream can repeat them, with the
    flushes written between them, in the same order. A chunk leaves the log
    when its answer arrives. A flush leaves it once no unanswered chunk was
    written before it: on a new stream it would come first, when the server
    has nothing buffered to flush. The in-flight window bounds the chunks it
    holds.
    """

    def __init__(self) -> None:
        # Keys are ChunkKey for chunks and ints for flushes.
        self._entries: collections.OrderedDict[ChunkKey | int, pb.StreamRequest] = collections.OrderedDict()
        self._flush_numbers = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def add_chunk(self, modality: Modality, sequence_number: int, request: pb.StreamRequest) -> None:
        self._entries[(modality, sequence_number)] = request

    def add_flush(self, request: pb.StreamRequest) -> None:
        """Keep a flush written after an unanswered chunk; drop one that no such chunk precedes."""
        if self._entries:
            self._entries[next(self._flush_numbers)] = request

    def remove_chunk(self, modality: Modality, sequence_number: int) -> None:
        """Drop an answered chunk, and the flushes that no unanswered chunk precedes any more."""
        self._entries.pop((modality, sequence_number), None)
        while self._entries:
            first = next(iter(self._entries))
            if not isinstance(first, int):
                break
            self._entries.popitem(last=False)

    def entries(self) -> list[tuple[ChunkKey | None, pb.StreamRequest]]:
        """Return (chunk key, request) pairs in write order; the key is None for a flush."""
        return [(None if isinstance(key, int) else key, request) for key, request in self._entries.items()]

    def clear(self) -> None:
        self._entries.clear()
