"""People and face detection on real video, and sentence embeddings of streamed text."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from conftest import MEDIA
from streamutil import jpeg, run_stream, video_frames
from streaminfer.server.models.text_embedding import _model_folder as model_folder
from streaminfer.v1 import streaminfer_pb2 as pb

VIDEO = MEDIA / "video" / "vtest.avi"


def video_config(*models: str) -> pb.StreamConfig:
    """A config that keeps every frame: these tests send frames faster than the detectors run."""
    return pb.StreamConfig(
        models=[pb.ModelSelection(model=model) for model in models],
        video_format=pb.VideoFormat(encoding=pb.IMAGE_ENCODING_JPEG),
        video_overflow_policy=pb.OVERFLOW_POLICY_BACKPRESSURE,
    )


def frame_requests(images: list[np.ndarray]) -> list[pb.StreamRequest]:
    return [
        pb.StreamRequest(frame=pb.VideoFrame(sequence_number=i, image_content=jpeg(image)))
        for i, image in enumerate(images)
    ]


def detections_by_frame(outcome, model: str) -> dict[int, pb.Detections]:
    return {
        result.first_sequence_number: result.detections
        for result in outcome.results
        if result.model == model and result.WhichOneof("payload") == "detections"
    }


def test_people_found_in_pedestrian_video(channel) -> None:
    images = video_frames(VIDEO, range(0, 400, 40))
    assert len(images) == 10

    outcome = run_stream(channel, video_config("hog_people"), frame_requests(images))

    found = detections_by_frame(outcome, "hog_people")
    assert sorted(found) == list(range(10))
    frames_with_people = [seq for seq, detections in found.items() if len(detections.detections) > 0]
    assert len(frames_with_people) >= 8, f"people found in only {frames_with_people}"
    height, width = images[0].shape[:2]
    for detections in found.values():
        assert (detections.frame_width, detections.frame_height) == (width, height)
        for detection in detections.detections:
            assert detection.label == "person"
            box = detection.box
            assert 0 <= box.x < width
            assert 0 <= box.y < height
            assert box.x + box.width <= width + 1
            assert box.y + box.height <= height + 1
    assert outcome.answered(pb.MODALITY_VIDEO) == list(range(10))


def test_blank_frame_has_no_detections(channel) -> None:
    blank = np.full((576, 768, 3), 127, dtype=np.uint8)

    outcome = run_stream(channel, video_config("hog_people", "haar_faces"), frame_requests([blank]))

    for model in ("hog_people", "haar_faces"):
        found = detections_by_frame(outcome, model)
        assert list(found) == [0], f"{model} gave no result for the frame"
        assert len(found[0].detections) == 0


def test_face_found_in_photograph(channel) -> None:
    image = cv2.imread(str(MEDIA / "video" / "messi5.jpg"))

    outcome = run_stream(channel, video_config("haar_faces"), frame_requests([image]))

    faces = detections_by_frame(outcome, "haar_faces")[0].detections
    assert 1 <= len(faces) <= 3
    assert all(face.label == "face" for face in faces)
    # The player facing the camera: his face spans about x 226-264, y 94-132.
    assert any(210 <= face.box.x <= 240 and 80 <= face.box.y <= 110 and 25 <= face.box.width <= 60 for face in faces), faces


@pytest.fixture(scope="module")
def reference_model() -> SentenceTransformer:
    return SentenceTransformer(str(model_folder()), device="cpu")


def text_config() -> pb.StreamConfig:
    return pb.StreamConfig(models=[pb.ModelSelection(model="minilm_embedding")])


def text_requests(pieces: list[str]) -> list[pb.StreamRequest]:
    return [pb.StreamRequest(text=pb.TextChunk(sequence_number=i, text=p.encode())) for i, p in enumerate(pieces)]


def embeddings(outcome) -> list[pb.Embedding]:
    return [result.embedding for result in outcome.results if result.WhichOneof("payload") == "embedding"]


def test_embedding_matches_sentence_transformers(channel, reference_model) -> None:
    sentence = "The quick brown fox jumps over the lazy dog."
    # Split mid-word, as a live transcript would arrive.
    pieces = ["The qui", "ck brown fox ju", "mps over the lazy dog. "]

    outcome = run_stream(channel, text_config(), text_requests(pieces))

    found = embeddings(outcome)
    assert len(found) == 1
    assert found[0].text == sentence
    expected = reference_model.encode([sentence], normalize_embeddings=True)[0]
    served = np.array(found[0].values, dtype=np.float32)
    assert served.shape == expected.shape == (384,)
    assert float(np.dot(served, expected)) > 0.9999
    assert outcome.answered(pb.MODALITY_TEXT) == [0, 1, 2]


def test_paraphrases_closer_than_unrelated(channel) -> None:
    text = "A man is playing a guitar. Someone plays an acoustic guitar. The stock market fell sharply today. "

    outcome = run_stream(channel, text_config(), text_requests([text]))

    vectors = [np.array(embedding.values) for embedding in embeddings(outcome)]
    assert len(vectors) == 3
    paraphrase = float(np.dot(vectors[0], vectors[1]))
    unrelated = float(np.dot(vectors[0], vectors[2]))
    assert paraphrase > unrelated + 0.2, f"paraphrase {paraphrase:.3f}, unrelated {unrelated:.3f}"


def test_text_file_streams_every_sentence(channel) -> None:
    text = (MEDIA / "text" / "gpl3_preamble.txt").read_text()
    pieces = [text[i : i + 64] for i in range(0, len(text), 64)]

    outcome = run_stream(channel, text_config(), text_requests(pieces))

    found = embeddings(outcome)
    assert len(found) >= 10
    assert outcome.answered(pb.MODALITY_TEXT) == list(range(len(pieces)))
    assert all(len(embedding.values) == 384 for embedding in found)
