"""OpenCV detectors: people in the street footage, nothing in a blank frame, same boxes as OpenCV itself."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from model_testing import MEDIA, load_model
from streaminfer.server.models import vision
from streaminfer.server.models.base import DecodedChunk, Model, StreamOptions
from streaminfer.v1 import streaminfer_pb2 as pb

OPTIONS = StreamOptions("test", interim_results=False)
# Frame 620 contains the one face-like patch that the cascade finds with its
# default settings in this footage.
FRAME_INDICES = (0, 100, 200, 620)


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(MEDIA / "video" / "vtest.avi"))
    assert capture.isOpened(), "OpenCV cannot read vtest.avi"
    frames = []
    index = 0
    while len(frames) < len(FRAME_INDICES):
        ok, frame = capture.read()
        assert ok, f"vtest.avi ended before frame {index}"
        if index in FRAME_INDICES:
            frames.append(frame)
        index += 1
    capture.release()
    return frames


@pytest.fixture(scope="module")
def people() -> Model:
    return load_model("hog_people")


@pytest.fixture(scope="module")
def faces() -> Model:
    return load_model("haar_faces")


def detect(model: Model, images: list[np.ndarray]) -> list[pb.Detections]:
    items = []
    for sequence_number, image in enumerate(images):
        items += model.preprocess(None, DecodedChunk(pb.MODALITY_VIDEO, sequence_number, image, sequence_number / 10))
    outputs = model.run_batch(items, [None] * len(items))
    results = [result for item, output in zip(items, outputs) for result in model.postprocess(None, item, output, OPTIONS)]
    assert [result.first_sequence_number for result in results] == list(range(len(images)))
    assert all(result.is_final for result in results)
    return [result.detections for result in results]


def boxes_of(detections: pb.Detections) -> list[tuple[float, float, float, float]]:
    return [(d.box.x, d.box.y, d.box.width, d.box.height) for d in detections.detections]


def test_people_found_in_street_frames(people: Model, frames: list[np.ndarray]) -> None:
    for detections in detect(people, frames):
        assert (detections.frame_width, detections.frame_height) == (768, 576)
        assert len(detections.detections) >= 1
        for detection in detections.detections:
            assert detection.label == "person"
            assert detection.score > 0
            box = detection.box
            assert box.width >= 64
            assert box.height >= 128
            # Padding lets a box reach past the border by at most 16 pixels.
            assert box.x >= -16
            assert box.y >= -16
            assert box.x + box.width <= 768 + 16
            assert box.y + box.height <= 576 + 16


def test_people_match_opencv(people: Model, frames: list[np.ndarray]) -> None:
    hog = cv2.HOGDescriptor()
    hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
    for frame, detections in zip(frames, detect(people, frames)):
        boxes, weights = hog.detectMultiScale(
            frame,
            hitThreshold=vision.HOG_HIT_THRESHOLD,
            winStride=vision.HOG_WIN_STRIDE,
            padding=vision.HOG_PADDING,
            scale=vision.HOG_SCALE,
            groupThreshold=vision.HOG_GROUP_THRESHOLD,
        )
        assert boxes_of(detections) == [tuple(float(v) for v in box) for box in np.asarray(boxes).reshape(-1, 4)]
        assert [d.score for d in detections.detections] == pytest.approx(np.asarray(weights).ravel().tolist(), rel=1e-6)


def test_batch_equals_single_frames(people: Model, frames: list[np.ndarray]) -> None:
    batched = detect(people, frames)
    single = [detect(people, [frame])[0] for frame in frames]
    assert [boxes_of(d) for d in batched] == [boxes_of(d) for d in single]


@pytest.mark.parametrize("kind", ["hog_people", "haar_faces"])
def test_blank_frame_has_no_detections(kind: str, people: Model, faces: Model) -> None:
    model = people if kind == "hog_people" else faces
    for blank in (np.zeros((480, 640, 3), np.uint8), np.full((480, 640, 3), 200, np.uint8)):
        (detections,) = detect(model, [blank])
        assert list(detections.detections) == []
        assert (detections.frame_width, detections.frame_height) == (640, 480)


def test_faces_match_opencv(faces: Model, frames: list[np.ndarray]) -> None:
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + vision.HAAR_CASCADE)
    found = detect(faces, frames)
    assert sum(len(detections.detections) for detections in found) >= 1, "nothing to compare"
    for frame, detections in zip(frames, found):
        grey = cv2.equalizeHist(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
        boxes, _, weights = cascade.detectMultiScale3(
            grey,
            scaleFactor=vision.HAAR_SCALE_FACTOR,
            minNeighbors=vision.HAAR_MIN_NEIGHBORS,
            minSize=vision.HAAR_MIN_SIZE,
            outputRejectLevels=True,
        )
        assert boxes_of(detections) == [tuple(float(v) for v in box) for box in np.asarray(boxes).reshape(-1, 4)]
        assert [d.score for d in detections.detections] == pytest.approx(np.asarray(weights).ravel().tolist(), rel=1e-6)
        assert all(d.label == "face" for d in detections.detections)
        assert all(d.score > 0 for d in detections.detections)
        assert (detections.frame_width, detections.frame_height) == (768, 576)


@pytest.mark.parametrize("bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32), "not an image"])
def test_rejects_non_bgr_frames(people: Model, bad: object) -> None:
    with pytest.raises(ValueError, match="H x W x 3 uint8 BGR"):
        people.preprocess(None, DecodedChunk(pb.MODALITY_VIDEO, 0, bad, None))
