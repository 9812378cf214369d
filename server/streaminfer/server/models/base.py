"""The interface between the executor and a model.

A model is driven in three steps, each on a known thread:

1. ``preprocess`` runs in the decode pool. It turns one decoded chunk of one
   stream into zero or more ``ModelInput`` items (for example, 512-sample VAD
   windows, or complete sentences) and keeps what is left over (a partial
   window, half a sentence) in the stream's ``preprocess_state``.
2. ``run_batch`` runs in an inference worker thread under
   ``torch.inference_mode``. It gets items of many streams at once. Items of a
   stateful model come with the stream's ``inference_state``. The executor
   never puts two items of one stream in a batch, nor runs one stream's items
   in two batches at once, so the model may read and replace that state.
3. ``postprocess`` runs in the same worker thread right after the batch and
   turns one item's output into ``StreamResult`` messages.

Each item says through which client sequence number the chunks are complete
once it is done (``completes_sequence_number``). The executor acknowledges a
chunk to the client when every model of its modality has completed it.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from streaminfer.v1 import streaminfer_pb2 as pb


@dataclasses.dataclass(frozen=True, slots=True)
class ModelInfo:
    """Static facts about a model, as ListModels reports them."""

    name: str
    modality: int  # pb.Modality value
    description: str
    stateful: bool = False
    labels: tuple[str, ...] = ()
    # For models fed raw tensors: element dtype name ("float32") and the shape
    # of one item without the batch dimension, -1 for a free size.
    input_dtype: str | None = None
    input_shape: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class StreamOptions:
    """Facts about the served stream that a model needs."""

    stream_id: str
    interim_results: bool
    audio_sample_rate_hertz: int = 0


@dataclasses.dataclass(slots=True)
class DecodedChunk:
    """One client chunk after decoding, in the form every model of its modality reads.

    For audio, ``data`` is float32 mono samples in [-1, 1] at
    ``sample_rate_hertz``. For video it is an H x W x 3 uint8 BGR image, and
    for text a str.
    """

    modality: int
    sequence_number: int
    data: Any
    # Media time of the chunk's start, seconds from the start of the stream.
    # For audio it is counted from the samples received; for video and text it
    # is the client's timestamp, or None when the client sent none.
    start_time: float | None
    sample_rate_hertz: int = 0


@dataclasses.dataclass(slots=True)
class ModelInput:
    """One item of work for a model's batch."""

    # Model-specific input: a tensor, an array, a string. None marks an item
    # that needs no inference and only completes chunks.
    data: Any
    first_sequence_number: int
    last_sequence_number: int
    # When done, the chunks up to and including this sequence number are
    # complete for this model. None completes nothing new.
    completes_sequence_number: int | None
    start_time: float | None = None
    end_time: float | None = None


class Model(abc.ABC):
    """A served model. Subclasses must be safe to call from several threads for
    different streams, as described in the module docstring."""

    info: ModelInfo

    @abc.abstractmethod
    def load(self, device: str) -> None:
        """Load weights onto ``device`` ("cpu" or "cuda:N")."""

    def new_preprocess_state(self, options: StreamOptions) -> Any:
        """Return per-stream state that ``preprocess`` and ``flush`` own."""
        return None

    def new_inference_state(self, options: StreamOptions) -> Any:
        """Return per-stream state that ``run_batch`` and ``postprocess`` own."""
        return None

    @abc.abstractmethod
    def preprocess(self, state: Any, chunk: DecodedChunk) -> list[ModelInput]:
        """Turn one decoded chunk into model inputs. Raise ValueError for bad input."""

    def flush(self, state: Any, last_sequence_number: int) -> list[ModelInput]:
        """Return inputs for buffered data at a flush or the end of input.

        After the returned items are done, every chunk up to
        ``last_sequence_number`` must be complete.
        """
        return [ModelInput(None, last_sequence_number, last_sequence_number, last_sequence_number)]

    @abc.abstractmethod
    def run_batch(self, inputs: Sequence[ModelInput], states: Sequence[Any]) -> list[Any]:
        """Run one batch and return one output per input, in order.

        ``states`` contains each item's stream inference state (None for
        stateless models). Raising fails every item of the batch; returning an
        exception instance in place of an output fails that item only.
        """

    @abc.abstractmethod
    def postprocess(
        self, state: Any, item: ModelInput, output: Any, options: StreamOptions
    ) -> list[pb.StreamResult]:
        """Turn one output into results. ``model`` and ``modality`` are filled in by the caller."""


def set_duration(target: Any, seconds: float | None) -> None:
    """Store ``seconds`` into a google.protobuf.Duration field, skipping None."""
    if seconds is None:
        return
    whole = int(seconds)
    target.seconds = whole
    target.nanos = int(round((seconds - whole) * 1e9))


def final_result(item: ModelInput, **payload: Any) -> pb.StreamResult:
    """Return a final result that covers ``item``'s chunks and media time, with one payload field set."""
    result = pb.StreamResult(
        first_sequence_number=item.first_sequence_number,
        last_sequence_number=item.last_sequence_number,
        is_final=True,
        **payload,
    )
    set_duration(result.start_time, item.start_time)
    set_duration(result.end_time, item.end_time)
    return result


def as_float32_mono(samples: np.ndarray, channels: int) -> np.ndarray:
    """Average interleaved channels down to one."""
    if channels <= 1:
        return samples
    return samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
