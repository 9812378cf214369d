"""A model that does no work: one empty-payload result per chunk.

It measures what the server itself costs per chunk (transport, decoding,
batching, routing), with inference taken out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from streaminfer.server.models.base import DecodedChunk, Model, ModelInfo, ModelInput, StreamOptions, final_result
from streaminfer.v1 import streaminfer_pb2 as pb

_MODALITIES = {"audio": pb.MODALITY_AUDIO, "video": pb.MODALITY_VIDEO, "text": pb.MODALITY_TEXT}


class NoopModel(Model):
    def __init__(self, name: str, modality: str = "audio") -> None:
        self.info = ModelInfo(
            name=name,
            modality=_MODALITIES[modality or "audio"],
            description="returns one empty result per chunk; for measuring server overhead",
        )

    def load(self, device: str) -> None:
        pass

    def preprocess(self, state: Any, chunk: DecodedChunk) -> list[ModelInput]:
        return [ModelInput(True, chunk.sequence_number, chunk.sequence_number, chunk.sequence_number, chunk.start_time)]

    def run_batch(self, inputs: Sequence[ModelInput], states: Sequence[Any]) -> list[Any]:
        return [None] * len(inputs)

    def postprocess(self, state: Any, item: ModelInput, output: Any, options: StreamOptions) -> list[pb.StreamResult]:
        return [final_result(item)]
