"""Text and JSON renderings of stream events and summaries, for the CLI."""

from __future__ import annotations

import collections
import json
import math
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from streaminfer.client._config import Modality
from streaminfer.client._events import ChunkFailed, ChunksAcked, Result, StreamEvent, StreamRolledOver, end_reason
from streaminfer.client._tracker import StreamStats, percentile
from streaminfer.v1 import streaminfer_pb2 as pb

__all__ = ["event_json", "format_event", "format_result", "json_line", "summary_json", "summary_lines"]

_EXCERPT_CHARS = 60


def json_line(kind: str, field: str, message: Message, **extra: Any) -> str:
    """Render one protobuf message as a single JSON line ``{"event": kind, field: ...}``.

    The message uses protobuf's JSON mapping: lowerCamelCase names, and 64-bit
    integers as strings.
    """
    data: dict[str, Any] = {"event": kind, field: json_format.MessageToDict(message)}
    data.update(extra)
    return json.dumps(data, separators=(",", ":"), allow_nan=False)


def _milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def event_json(event: StreamEvent) -> str:
    """Render a stream event as one JSON line; latencies are in milliseconds."""
    if isinstance(event, Result):
        return json_line("result", "result", event.proto)
    if isinstance(event, ChunksAcked):
        latencies = {str(number): _milliseconds(latency) for number, latency in event.latencies_s}
        return json_line("ack", "ack", event.proto, latencyMs=latencies)
    if isinstance(event, ChunkFailed):
        return json_line(
            "chunkError", "error", event.proto, latencyMs=_milliseconds(event.latency_s), fromClient=event.from_client
        )
    if isinstance(event, StreamRolledOver):
        resent = [{"modality": modality.label, "sequenceNumber": number} for modality, number in event.resent]
        return json_line(
            "rolledOver", "previousEnd", event.previous_end,
            previousStreamId=event.previous_stream_id, streamId=event.stream_id, resent=resent,
        )
    return json_line("streamEnd", "streamEnd", event.proto)


def _sequence_range(first: int, last: int) -> str:
    return f"{first}" if first == last else f"{first}-{last}"


def _result_prefix(result: Result) -> str:
    modality = result.modality
    numbers = _sequence_range(result.first_sequence_number, result.last_sequence_number)
    if modality is Modality.AUDIO and result.start_time_s is not None:
        return f"[audio {result.start_time_s:.2f}s]"
    if modality is Modality.VIDEO:
        return f"[video frame {numbers}]"
    return f"[{modality.label} #{numbers}]"


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    if len(flat) > _EXCERPT_CHARS:
        flat = flat[: _EXCERPT_CHARS - 3] + "..."
    return json.dumps(flat, ensure_ascii=False)


def _describe_payload(result: Result) -> str:
    proto = result.proto
    if result.kind == "speech":
        speech = proto.speech
        probability = f"p={speech.speech_probability:.2f}"
        if speech.event_type == pb.SPEECH_EVENT_TYPE_SPEECH_START:
            return f"speech start {probability}"
        if speech.event_type == pb.SPEECH_EVENT_TYPE_SPEECH_END:
            span = ""
            if result.start_time_s is not None and result.end_time_s is not None:
                span = f" {result.start_time_s:.2f}-{result.end_time_s:.2f}s"
            return f"speech end{span} {probability}"
        if speech.event_type == pb.SPEECH_EVENT_TYPE_ACTIVITY:
            return f"activity {probability}"
        return f"speech event {speech.event_type} {probability}"
    if result.kind == "detections":
        labels = collections.Counter(detection.label or "object" for detection in proto.detections.detections)
        if not labels:
            return "0 detections"
        return ", ".join(f"{count} {label}(s)" for label, count in labels.items())
    if result.kind == "embedding":
        description = f"{len(proto.embedding.values)}-d"
        if proto.embedding.text:
            description += f" {_excerpt(proto.embedding.text)}"
        return description
    if result.kind == "tensor":
        data_type = pb.DataType.Name(proto.tensor.data_type).removeprefix("DATA_TYPE_").lower()
        return f"tensor {data_type}[{', '.join(str(size) for size in proto.tensor.shape)}]"
    return "no payload"


def format_result(result: Result, prefix: str | None = None) -> str:
    """Render a result as one line, for example ``[audio 0.42s] silero_vad speech start p=0.93``."""
    line = f"{prefix or _result_prefix(result)} {result.model} {_describe_payload(result)}"
    return line if result.is_final else f"{line} (interim)"


def format_event(event: StreamEvent) -> str | None:
    """Render a result, chunk error or roll-over as one line; None for acks and the stream end."""
    if isinstance(event, Result):
        return format_result(event)
    if isinstance(event, StreamRolledOver):
        return (
            f"[stream] stream {event.previous_stream_id} ended ({event.reason}); "
            f"continuing as stream {event.stream_id}, {len(event.resent)} chunk(s) resent"
        )
    if isinstance(event, ChunkFailed):
        if event.modality is Modality.VIDEO:
            where = f"[video frame {event.sequence_number}]"
        else:
            where = f"[{event.modality.label} #{event.sequence_number}]"
        model = f" ({event.model})" if event.model else ""
        return f"{where} chunk failed: {event.reason}{model}: {event.message}"
    return None


def _latency_text(latencies: list[float]) -> str:
    if not latencies:
        return "latency n/a"
    return f"latency p50 {percentile(latencies, 0.5) * 1000:.1f} ms, p99 {percentile(latencies, 0.99) * 1000:.1f} ms"


def summary_lines(stream_id: str, stats: StreamStats, stream_end: pb.StreamEnd | None) -> list[str]:
    """Render the end-of-stream summary: chunks and latency per modality, results per model."""
    lines = [f"summary of stream {stream_id}:"]
    for modality in sorted(stats.modalities):
        counts = stats.modalities[modality]
        line = f"  {modality.label:<5}  sent {counts.sent}, acked {counts.acked}, failed {counts.failed}"
        if counts.failures_by_reason:
            reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(counts.failures_by_reason.items()))
            line += f" ({reasons})"
        if counts.unanswered:
            line += f", unanswered {counts.unanswered}"
        lines.append(f"{line}; {_latency_text(counts.latencies_s)} per chunk")
    if len(stats.modalities) > 1:
        lines.append(f"  all    {_latency_text(stats.latencies_s())} per chunk")

    results = ", ".join(f"{model} {count}" for model, count in sorted(stats.results_by_model.items()))
    lines.append(f"  results: {results or 'none'}")
    if stats.rollovers:
        resent = sum(counts.resent for counts in stats.modalities.values())
        lines.append(f"  rolled over to a new stream {stats.rollovers} time(s), {resent} chunk(s) resent")
    if stats.unexpected_answers:
        lines.append(f"  answers for chunks not outstanding: {stats.unexpected_answers}")

    mismatches = _server_count_mismatches(stats, stream_end)
    if mismatches:
        lines.append(f"  server counted differently: {'; '.join(mismatches)}")
    if stream_end is None:
        lines.append("  the stream ended without StreamEnd")
    elif stream_end.reason not in (pb.STREAM_END_REASON_UNSPECIFIED, pb.STREAM_END_REASON_INPUT_ENDED):
        lines.append(f"  the server ended the stream: {end_reason(stream_end)}")
    return lines


def _server_count_mismatches(stats: StreamStats, stream_end: pb.StreamEnd | None) -> list[str]:
    # After a roll-over, the last StreamEnd counts only the last stream.
    if stream_end is None or stats.rollovers:
        return []
    mismatches = []
    for totals in stream_end.totals:
        modality = Modality(totals.modality)
        counts = stats.modality(modality)
        server = (totals.chunks_received, totals.chunks_acked, totals.chunks_failed)
        if server != (counts.sent, counts.acked, counts.failed):
            mismatches.append(
                f"{modality.label} received {server[0]}, acked {server[1]}, failed {server[2]}"
            )
    return mismatches


def summary_json(stream_id: str, stats: StreamStats) -> str:
    """Render the summary as one JSON line; latencies are in milliseconds, null when there are none."""

    def milliseconds_at(latencies: list[float], fraction: float) -> float | None:
        value = percentile(latencies, fraction)
        return None if math.isnan(value) else round(value * 1000, 3)

    modalities = {}
    for modality in sorted(stats.modalities):
        counts = stats.modalities[modality]
        modalities[modality.label] = {
            "sent": counts.sent,
            "acked": counts.acked,
            "failed": counts.failed,
            "unanswered": counts.unanswered,
            "resent": counts.resent,
            "failuresByReason": dict(sorted(counts.failures_by_reason.items())),
            "latencyP50Ms": milliseconds_at(counts.latencies_s, 0.5),
            "latencyP99Ms": milliseconds_at(counts.latencies_s, 0.99),
        }
    everything = stats.latencies_s()
    data = {
        "event": "summary",
        "streamId": stream_id,
        "modalities": modalities,
        "resultsByModel": dict(sorted(stats.results_by_model.items())),
        "latencyP50Ms": milliseconds_at(everything, 0.5),
        "latencyP99Ms": milliseconds_at(everything, 0.99),
        "unexpectedAnswers": stats.unexpected_answers,
        "rollovers": stats.rollovers,
    }
    return json.dumps(data, separators=(",", ":"), allow_nan=False)
