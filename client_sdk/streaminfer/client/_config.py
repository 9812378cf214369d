"""Stream configuration in plain Python terms, converted to ``StreamConfig``."""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable

from streaminfer.v1 import streaminfer_pb2 as pb

__all__ = ["AudioFormat", "Modality", "VideoFormat", "stream_config"]


class Modality(enum.IntEnum):
    """The kind of media a chunk carries; values equal ``streaminfer.v1.Modality``."""

    UNSPECIFIED = pb.MODALITY_UNSPECIFIED
    AUDIO = pb.MODALITY_AUDIO
    VIDEO = pb.MODALITY_VIDEO
    TEXT = pb.MODALITY_TEXT

    @classmethod
    def parse(cls, value: Modality | str | int) -> Modality:
        """Convert ``"audio"``, ``Modality.AUDIO`` or ``1`` to a ``Modality``."""
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(f"modality {value!r} is invalid: expected audio, video or text") from None
        try:
            return cls(value)
        except ValueError:
            numbers = ", ".join(f"{int(member)} ({member.label})" for member in (cls.AUDIO, cls.VIDEO, cls.TEXT))
            raise ValueError(
                f"modality {value!r} is invalid: expected audio, video or text, as a name, a Modality or a number: {numbers}"
            ) from None

    @property
    def label(self) -> str:
        """Lower-case name, as the CLI prints it."""
        return self.name.lower()


_AUDIO_ENCODINGS = {
    "linear16": pb.AUDIO_ENCODING_LINEAR16,
    "float32": pb.AUDIO_ENCODING_FLOAT32,
}
_PRIORITIES = {
    "interactive": pb.PRIORITY_INTERACTIVE,
    "bulk": pb.PRIORITY_BULK,
}
_OVERFLOW_POLICIES = {
    "keep_latest": pb.OVERFLOW_POLICY_KEEP_LATEST,
    "backpressure": pb.OVERFLOW_POLICY_BACKPRESSURE,
}
_IMAGE_ENCODINGS = {
    "jpeg": pb.IMAGE_ENCODING_JPEG,
    "png": pb.IMAGE_ENCODING_PNG,
    "raw_rgb24": pb.IMAGE_ENCODING_RAW_RGB24,
    "raw_bgr24": pb.IMAGE_ENCODING_RAW_BGR24,
}


@dataclasses.dataclass(frozen=True, slots=True)
class AudioFormat:
    """Audio sample format of a stream or of one ``infer`` call."""

    sample_rate_hertz: int
    # Interleaved channels; the server averages them to mono.
    channel_count: int = 1
    # "linear16" (signed 16-bit little-endian) or "float32" (little-endian, -1.0 to 1.0).
    encoding: str = "linear16"

    def __post_init__(self) -> None:
        if self.sample_rate_hertz <= 0:
            raise ValueError(f"sample_rate_hertz = {self.sample_rate_hertz!r} is invalid: expected hertz > 0")
        if self.channel_count <= 0:
            raise ValueError(f"channel_count = {self.channel_count!r} is invalid: expected 1 or more")
        if self.encoding not in _AUDIO_ENCODINGS:
            raise ValueError(
                f"audio encoding {self.encoding!r} is invalid: expected one of {', '.join(_AUDIO_ENCODINGS)}"
            )

    @property
    def bytes_per_second(self) -> int:
        sample_bytes = 2 if self.encoding == "linear16" else 4
        return self.sample_rate_hertz * self.channel_count * sample_bytes

    def to_proto(self) -> pb.AudioFormat:
        return pb.AudioFormat(
            encoding=_AUDIO_ENCODINGS[self.encoding],
            sample_rate_hertz=self.sample_rate_hertz,
            audio_channel_count=self.channel_count,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class VideoFormat:
    """Image format of a stream's frames or of one ``infer`` image."""

    # "jpeg", "png", "raw_rgb24" or "raw_bgr24".
    encoding: str = "jpeg"
    # Frame size in pixels; required for raw encodings, ignored otherwise.
    width: int = 0
    height: int = 0

    def __post_init__(self) -> None:
        if self.encoding not in _IMAGE_ENCODINGS:
            raise ValueError(
                f"image encoding {self.encoding!r} is invalid: expected one of {', '.join(_IMAGE_ENCODINGS)}"
            )
        if self.encoding.startswith("raw_") and (self.width <= 0 or self.height <= 0):
            raise ValueError(
                f"{self.encoding} frames of {self.width}x{self.height} pixels are invalid: "
                "raw encodings need width and height > 0"
            )

    def to_proto(self) -> pb.VideoFormat:
        return pb.VideoFormat(encoding=_IMAGE_ENCODINGS[self.encoding], width=self.width, height=self.height)


ModelSpec = str | tuple[str, Modality | str]


def stream_config(
    models: Iterable[ModelSpec],
    *,
    audio: AudioFormat | None = None,
    video: VideoFormat | None = None,
    interim_results: bool = False,
    label: str = "",
    priority: str | None = None,
    chunk_latency_budget_s: float | None = None,
    video_overflow_policy: str | None = None,
) -> pb.StreamConfig:
    """Build the first message of a stream.

    ``models`` holds model names (each runs on its own modality) or
    ``(name, modality)`` pairs. ``audio`` is required when an audio model is
    selected and ``video`` when a video model is; the server rejects the
    stream otherwise.

    ``priority`` is "interactive" or "bulk": queued interactive work runs
    before bulk work. ``chunk_latency_budget_s`` is how long, in seconds
    after the server reads a chunk, its result is still useful. A chunk that
    cannot get its result in time fails with reason DEADLINE instead of running.
    ``video_overflow_policy`` is "keep_latest" (when the video falls behind
    its models, older waiting frames fail with reason OVERFLOW) or
    "backpressure" (no frame is dropped; the in-flight window holds the
    sender back). None leaves each to the server's default: interactive, the
    server's budget (``SessionAccepted.limits.chunk_latency_budget``) and
    keep_latest.
    """
    selections = []
    for spec in models:
        if isinstance(spec, str):
            name, modality = spec, Modality.UNSPECIFIED
        else:
            name, modality = spec[0], Modality.parse(spec[1])
        if not name:
            raise ValueError("model name '' is invalid: expected a name from list_models")
        selections.append(pb.ModelSelection(model=name, modality=int(modality)))
    if not selections:
        raise ValueError("models is empty: a stream needs at least one model")

    config = pb.StreamConfig(models=selections, interim_results=interim_results, label=label)
    if priority is not None:
        config.priority = _choice("priority", priority, _PRIORITIES)
    if chunk_latency_budget_s is not None:
        # Zero on the wire means the server's budget, so a budget must round to 1 ns or more.
        if not (math.isfinite(chunk_latency_budget_s) and round(chunk_latency_budget_s * 1e9) > 0):
            raise ValueError(
                f"chunk_latency_budget_s = {chunk_latency_budget_s!r} is invalid: "
                "expected seconds > 0, or None for the server's budget"
            )
        config.chunk_latency_budget.FromNanoseconds(round(chunk_latency_budget_s * 1e9))
    if video_overflow_policy is not None:
        config.video_overflow_policy = _choice("video_overflow_policy", video_overflow_policy, _OVERFLOW_POLICIES)
    if audio is not None:
        config.audio_format.CopyFrom(audio.to_proto())
    if video is not None:
        config.video_format.CopyFrom(video.to_proto())
    return config


def _choice(name: str, value: str, choices: dict[str, int]) -> int:
    try:
        return choices[value]
    except (KeyError, TypeError):
        raise ValueError(f"{name} {value!r} is invalid: expected one of {', '.join(choices)}") from None
