"""User models: a TorchScript archive or a torch.export archive, declared in the config.

The config gives the archive ``path``, the input ``modality``, ``input_shape``
(one item, without the batch dimension, -1 for a free size) and
``input_dtype``. What one item is depends on the modality:

- audio: a window of ``input_shape[-1]`` mono samples at the stream's own
  sample rate (no resampling), cut like the VAD's windows. Every other size of
  ``input_shape`` must be 1 (or -1, read as 1). A flush pads the last partial
  window with zeros.
- video: the frame as RGB (or grey for one channel), resized to
  ``input_shape`` = (C, H, W), scaled to [0, 1]. A -1 height or width keeps
  the frame's own size on that axis.
- no modality: the model takes raw tensors only, through the unary Infer
  call (``input_from_tensor`` and ``infer_tensor``).

Text user models are not supported. ``run_batch`` stacks the items of a batch
into one tensor and calls the model once per distinct item shape. Each item's
output (the model's output row for it, as a Tensor payload) is one result.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch

from streaminfer.server.config import ConfigError, ModelConfig
from streaminfer.server.models.base import DecodedChunk, Model, ModelInfo, ModelInput, StreamOptions, final_result
from streaminfer.server.models.silero_vad import AudioWindower
from streaminfer.v1 import streaminfer_pb2 as pb

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class _DataType:
    torch_dtype: torch.dtype
    proto: int
    # Little-endian numpy dtype of the wire format.
    numpy_dtype: str


DATA_TYPES = {
    "float32": _DataType(torch.float32, pb.DATA_TYPE_FLOAT32, "<f4"),
    "float16": _DataType(torch.float16, pb.DATA_TYPE_FLOAT16, "<f2"),
    "int64": _DataType(torch.int64, pb.DATA_TYPE_INT64, "<i8"),
    "int32": _DataType(torch.int32, pb.DATA_TYPE_INT32, "<i4"),
    "uint8": _DataType(torch.uint8, pb.DATA_TYPE_UINT8, "u1"),
}
_OUTPUT_NAMES = {data_type.torch_dtype: name for name, data_type in DATA_TYPES.items()}
_STREAM_MODALITIES = {"audio": pb.MODALITY_AUDIO, "video": pb.MODALITY_VIDEO, "": pb.MODALITY_UNSPECIFIED}


def tensor_to_proto(tensor: torch.Tensor) -> pb.Tensor:
    """Return ``tensor`` as a Tensor payload. float64 becomes float32 and bool becomes uint8."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.float64:
        tensor = tensor.to(torch.float32)
    elif tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8)
    name = _OUTPUT_NAMES.get(tensor.dtype)
    if name is None:
        raise TypeError(f"model output dtype {tensor.dtype} has no Tensor payload type; expected one of {', '.join(DATA_TYPES)}")
    array = tensor.contiguous().numpy().astype(DATA_TYPES[name].numpy_dtype, copy=False)
    return pb.Tensor(data_type=DATA_TYPES[name].proto, shape=list(tensor.shape), content=array.tobytes())


class UserModel(Model):
    """A model from a TorchScript (``torchscript``) or torch.export (``torch_export``) archive."""

    def __init__(self, config: ModelConfig) -> None:
        self._config = config
        self._shape = tuple(config.input_shape)
        self._data_type = DATA_TYPES.get(config.input_dtype)
        self._check_config()
        self.info = ModelInfo(
            name=config.name,
            modality=_STREAM_MODALITIES[config.modality],
            description=config.description or f"user {config.kind} model from {config.path}",
            input_dtype=config.input_dtype,
            input_shape=self._shape,
        )
        self._device = torch.device("cpu")
        self._module: Any = None
        # Set when a torch.export archive was exported with a fixed batch size.
        self._static_batch_size: int | None = None

    def _check_config(self) -> None:
        config = self._config
        where = f"model {config.name!r}"
        if config.modality not in _STREAM_MODALITIES:
            raise ConfigError(
                f"{where}: modality = {config.modality!r} is not supported for user models: "
                "expected audio, video, or none for raw tensors only"
            )
        if self._data_type is None:
            raise ConfigError(f"{where}: input_dtype = {config.input_dtype!r} is invalid: expected one of {', '.join(DATA_TYPES)}")
        if not self._shape:
            raise ConfigError(f"{where}: input_shape is missing: give the shape of one item, without the batch dimension")
        stream_dtypes = ("float32", "float16")
        if config.modality in ("audio", "video") and config.input_dtype not in stream_dtypes:
            raise ConfigError(
                f"{where}: input_dtype = {config.input_dtype!r} is invalid for {config.modality}: expected float32 or float16"
            )
        if config.modality == "audio":
            if self._shape[-1] < 1:
                raise ConfigError(
                    f"{where}: input_shape = {list(self._shape)} is invalid for audio: the last size is the window "
                    "length in samples and must be fixed"
                )
            if any(size not in (1, -1) for size in self._shape[:-1]):
                raise ConfigError(
                    f"{where}: input_shape = {list(self._shape)} is invalid for audio: every size but the last must be 1 (mono)"
                )
        if config.modality == "video" and (len(self._shape) != 3 or self._shape[0] not in (1, 3)):
            raise ConfigError(
                f"{where}: input_shape = {list(self._shape)} is invalid for video: expected (C, H, W) with C = 1 or 3"
            )

    def load(self, device: str) -> None:
        path = self._config.path
        if not os.path.isfile(path):
            raise ConfigError(f"model {self._config.name!r}: path = {path!r} is not a file: expected a saved model archive")
        self._device = torch.device(device)
        if self._config.kind == "torchscript":
            self._module = torch.jit.load(path, map_location=self._device)
            self._module.eval()
        else:
            exported = torch.export.load(path)
            self._static_batch_size = _static_batch_size(exported)
            # NOTE: an exported graph may hold device-specific constants;
            # moving it to another device than it was exported on is
            # tested on the CPU only.
            # Train or eval mode is fixed when a program is exported, and
            # its module rejects eval().
            self._module = exported.module().to(self._device)
        logger.info(
            "user model %s (%s) loaded from %s on %s, static batch size %s",
            self._config.name,
            self._config.kind,
            path,
            device,
            self._static_batch_size,
        )

    def new_preprocess_state(self, options: StreamOptions) -> AudioWindower | None:
        if self._config.modality != "audio":
            return None
        return AudioWindower(self._shape[-1], options.audio_sample_rate_hertz)

    # -- preprocess (decode pool) ---------------------------------------------

    def preprocess(self, state: AudioWindower | None, chunk: DecodedChunk) -> list[ModelInput]:
        modality = self._config.modality
        if modality == "audio":
            return self._preprocess_audio(state, chunk)
        if modality == "video":
            image = self._frame_to_input(chunk.data)
            sequence_number = chunk.sequence_number
            return [ModelInput(image, sequence_number, sequence_number, sequence_number, chunk.start_time, chunk.start_time)]
        raise ValueError(f"model {self._config.name!r} takes raw tensors only; send them with Infer and InferRequest.tensor")

    def flush(self, state: AudioWindower | None, last_sequence_number: int) -> list[ModelInput]:
        if state is None:
            return super().flush(state, last_sequence_number)
        item = state.flush(last_sequence_number)
        if item.data is not None:
            item.data = item.data.reshape(self._item_shape())
        return [item]

    def _preprocess_audio(self, windower: AudioWindower, chunk: DecodedChunk) -> list[ModelInput]:
        samples = np.asarray(chunk.data, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"audio samples have shape {samples.shape}, expected a 1-D array of mono samples")
        if chunk.sample_rate_hertz and chunk.sample_rate_hertz != windower.sample_rate_hertz:
            if windower.position:
                raise ValueError(
                    f"sample_rate_hertz = {chunk.sample_rate_hertz} differs from the stream's "
                    f"{windower.sample_rate_hertz}; a stream keeps one sample rate"
                )
            windower.sample_rate_hertz = chunk.sample_rate_hertz
        if windower.sample_rate_hertz <= 0:
            raise ValueError(f"sample_rate_hertz = {windower.sample_rate_hertz} is invalid: expected a positive rate")
        windower.add_chunk(chunk.sequence_number, windower.position + len(samples))
        items = windower.push(samples)
        for item in items:
            if item.data is not None:
                item.data = item.data.reshape(self._item_shape())
        return items

    def _item_shape(self) -> tuple[int, ...]:
        return tuple(1 if size == -1 else size for size in self._shape)

    def _frame_to_input(self, image: Any) -> np.ndarray:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError("frame is not an H x W x 3 uint8 BGR image")
        channels, height, width = self._shape
        frame_height, frame_width = image.shape[:2]
        height = frame_height if height == -1 else height
        width = frame_width if width == -1 else width
        if (height, width) != (frame_height, frame_width):
            shrinking = height * width < frame_height * frame_width
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        if channels == 1:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[:, :, None]
        else:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) * np.float32(1.0 / 255.0)

    # -- raw tensors (unary Infer) --------------------------------------------

    def input_from_tensor(self, tensor: pb.Tensor) -> ModelInput:
        """Check a raw input tensor against the declared spec and return it as one item.

        The tensor is one item, without the batch dimension. Raises ValueError
        naming the field, its value and what was expected.
        """
        name = self._config.name
        expected_type = self._data_type.proto
        if tensor.data_type != expected_type:
            raise ValueError(
                f"tensor.data_type = {pb.DataType.Name(tensor.data_type)} is invalid for model {name!r}: "
                f"expected {pb.DataType.Name(expected_type)}"
            )
        shape = tuple(tensor.shape)
        fits = len(shape) == len(self._shape) and all(
            size >= 1 and (declared == -1 or size == declared) for size, declared in zip(shape, self._shape)
        )
        if not fits:
            raise ValueError(
                f"tensor.shape = {list(shape)} is invalid for model {name!r}: expected {list(self._shape)} "
                "(one item without the batch dimension; -1 is any size)"
            )
        item_size = np.dtype(self._data_type.numpy_dtype).itemsize
        expected_bytes = math.prod(shape) * item_size
        if len(tensor.content) != expected_bytes:
            raise ValueError(
                f"tensor.content has {len(tensor.content)} bytes, invalid for shape {list(shape)} of "
                f"{self._config.input_dtype}: expected {expected_bytes} bytes"
            )
        array = np.frombuffer(tensor.content, dtype=self._data_type.numpy_dtype).reshape(shape)
        return ModelInput(array, 0, 0, 0)

    def infer_tensor(self, tensor: pb.Tensor) -> pb.Tensor:
        """Run the model on one raw input tensor in the calling thread and return its output."""
        item = self.input_from_tensor(tensor)
        with torch.inference_mode():
            (output,) = self.run_batch([item], [None])
        return output

    # -- inference (worker thread) --------------------------------------------

    def run_batch(self, inputs: Sequence[ModelInput], states: Sequence[Any]) -> list[Any]:
        outputs: list[Any] = [None] * len(inputs)

        # 1. Items stack only with items of the same shape (free sizes differ).
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, item in enumerate(inputs):
            groups.setdefault(item.data.shape, []).append(index)

        # 2. One call per group, or per fixed-size slice of it for an
        # archive exported with a static batch size.
        step = self._static_batch_size
        for indices in groups.values():
            for offset in range(0, len(indices), step or len(indices)):
                part = indices[offset : offset + (step or len(indices))]
                rows = self._call([inputs[index].data for index in part])
                for index, row in zip(part, rows):
                    outputs[index] = tensor_to_proto(row)
        return outputs

    def _call(self, arrays: list[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(arrays)).to(self._device, self._data_type.torch_dtype)
        rows = len(arrays)
        if self._static_batch_size and rows < self._static_batch_size:
            padding = batch.new_zeros((self._static_batch_size - rows, *batch.shape[1:]))
            batch = torch.cat((batch, padding))
        output = self._module(batch)
        if isinstance(output, (tuple, list)) and len(output) == 1:
            output = output[0]
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"model {self._config.name!r} returned {type(output).__name__}; "
                "expected one tensor (or a tuple of one) for the Tensor payload"
            )
        if output.ndim == 0 or output.shape[0] != batch.shape[0]:
            raise ValueError(
                f"model {self._config.name!r} returned shape {list(output.shape)} for a batch of {batch.shape[0]}: "
                "expected the batch size as the first dimension"
            )
        return output[:rows]

    def postprocess(self, state: Any, item: ModelInput, output: pb.Tensor, options: StreamOptions) -> list[pb.StreamResult]:
        return [final_result(item, tensor=output)]


def _static_batch_size(exported: Any) -> int | None:
    """Return the first input's batch size when the archive fixes it, else None."""
    user_inputs = set(exported.graph_signature.user_inputs)
    for node in exported.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        value = node.meta.get("val")
        if value is None or value.ndim == 0:
            return None
        size = value.shape[0]
        return size if isinstance(size, int) else None
    return None
