"""Typed stream events: one per result, acknowledgement, chunk error and stream end.

One ``StreamResponse`` may carry several results, acks and errors. The session
turns it into events in that order, so the results that cover a chunk come
before its acknowledgement, as the API promises. A session in roll-over mode
also emits ``StreamRolledOver`` when it continues on a new stream.
"""

from __future__ import annotations

import dataclasses

from google.protobuf import duration_pb2

from streaminfer.client._config import Modality
from streaminfer.v1 import streaminfer_pb2 as pb

__all__ = ["ChunkFailed", "ChunksAcked", "Result", "StreamEnded", "StreamEvent", "StreamRolledOver"]


def seconds_of(duration: duration_pb2.Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    """One model result; ``proto`` is the ``StreamResult`` as received."""

    proto: pb.StreamResult

    @property
    def model(self) -> str:
        return self.proto.model

    @property
    def modality(self) -> Modality:
        return Modality(self.proto.modality)

    @property
    def is_final(self) -> bool:
        return self.proto.is_final

    @property
    def first_sequence_number(self) -> int:
        return self.proto.first_sequence_number

    @property
    def last_sequence_number(self) -> int:
        return self.proto.last_sequence_number

    @property
    def start_time_s(self) -> float | None:
        """Media time of the start of the covered span, in seconds; None when unset."""
        return seconds_of(self.proto.start_time) if self.proto.HasField("start_time") else None

    @property
    def end_time_s(self) -> float | None:
        """Media time of the end of the covered span, in seconds; None when unset."""
        return seconds_of(self.proto.end_time) if self.proto.HasField("end_time") else None

    @property
    def kind(self) -> str:
        """Payload kind: "speech", "embedding", "detections", "tensor", or "" for none."""
        return self.proto.WhichOneof("payload") or ""


@dataclasses.dataclass(frozen=True, slots=True)
class ChunksAcked:
    """Chunks that every model of their modality has processed."""

    proto: pb.ChunkAck
    # (sequence number, seconds from write to this ack) of each chunk the ack
    # settled, in sequence-number order.
    latencies_s: tuple[tuple[int, float], ...]

    @property
    def modality(self) -> Modality:
        return Modality(self.proto.modality)

    @property
    def first_sequence_number(self) -> int:
        return self.proto.first_sequence_number

    @property
    def last_sequence_number(self) -> int:
        return self.proto.last_sequence_number


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkFailed:
    """A chunk the server rejected or dropped; the stream goes on.

    The session also emits one with reason SHUTDOWN for each chunk still
    unanswered when the stream ends; ``from_client`` is True for those.
    """

    proto: pb.ChunkError
    # Seconds from write to this error; None when the chunk was not outstanding.
    latency_s: float | None
    # True when the session, not the server, reported the failure.
    from_client: bool = False

    @property
    def modality(self) -> Modality:
        return Modality(self.proto.modality)

    @property
    def sequence_number(self) -> int:
        return self.proto.sequence_number

    @property
    def reason(self) -> str:
        """The reason without its prefix, for example "DEADLINE" or "TOO_LARGE"."""
        return pb.ChunkErrorReason.Name(self.proto.reason).removeprefix("CHUNK_ERROR_REASON_")

    @property
    def message(self) -> str:
        return self.proto.message

    @property
    def model(self) -> str:
        return self.proto.model


@dataclasses.dataclass(frozen=True, slots=True)
class StreamEnded:
    """The server's last message: totals per modality as the server counted them."""

    proto: pb.StreamEnd

    @property
    def results_sent(self) -> int:
        return self.proto.results_sent

    @property
    def reason(self) -> str:
        """The reason the stream ended, for example "INPUT_ENDED" or "DRAINING".

        It is "UNSPECIFIED" from a server that sends no reason.
        """
        return end_reason(self.proto)


@dataclasses.dataclass(frozen=True, slots=True)
class StreamRolledOver:
    """The session goes on in a new stream after the server ended the previous one.

    Chunks the previous stream left unanswered were resent on the new stream
    with their sequence numbers; their answers follow as usual.
    """

    # The StreamEnd of the previous stream, with its reason and totals.
    previous_end: pb.StreamEnd
    previous_stream_id: str
    # The new stream's SessionAccepted.
    accepted: pb.SessionAccepted
    # (modality, sequence number) of each chunk resent, in the order written.
    resent: tuple[tuple[Modality, int], ...]

    @property
    def stream_id(self) -> str:
        """The new stream's id."""
        return self.accepted.stream_id

    @property
    def reason(self) -> str:
        """Why the previous stream ended, for example "MAX_DURATION"."""
        return end_reason(self.previous_end)


def end_reason(stream_end: pb.StreamEnd) -> str:
    """Return the ``StreamEnd`` reason without its prefix, for example "DRAINING"."""
    return pb.StreamEndReason.Name(stream_end.reason).removeprefix("STREAM_END_REASON_")


StreamEvent = Result | ChunksAcked | ChunkFailed | StreamEnded | StreamRolledOver
