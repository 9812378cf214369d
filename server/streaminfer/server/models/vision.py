"""OpenCV detectors for video frames: HOG people detection and Haar cascade face detection.

Both read H x W x 3 uint8 BGR frames and return boxes in frame pixels. A batch
is a loop over its frames: OpenCV releases the GIL inside each call, so
several instances run in parallel, but a frame gains nothing from being in a
batch with others.

OpenCV's own thread pool is limited to one thread (``cv2.setNumThreads(1)``,
process-wide, set at load). With more threads one frame spreads over every
core and competes with the event loop and the torch workers, so streams'
latency gets worse under load. Parallelism comes from running frames of
several streams at once (``instances``) instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from streaminfer.server.config import ModelConfig
from streaminfer.server.models.base import DecodedChunk, Model, ModelInfo, ModelInput, StreamOptions, final_result
from streaminfer.v1 import streaminfer_pb2 as pb

logger = logging.getLogger(__name__)

# HOG people detector (Dalal-Triggs, OpenCV's default 64 x 128 linear SVM).
# The window moves by one 8-pixel cell, the descriptor's own step: a coarser
# stride misses people, and a finer one costs four times as much.
# 16 pixels of padding let it find people cut by the frame border.
# Pyramid steps of 1.05 keep every person within 5 % of some window size.
# A hit needs a positive SVM margin, and overlapping hits are grouped, keeping
# groups of at least 2 hits (OpenCV's default).
# The smallest person found fills a 64 x 128 window with its margins, so about
# 48 x 96 pixels of person. Upscale frames to find smaller people.
# The default people detector's window, in pixels.
HOG_WINDOW_WIDTH = 64
HOG_WINDOW_HEIGHT = 128
HOG_WIN_STRIDE = (8, 8)
HOG_PADDING = (16, 16)
HOG_SCALE = 1.05
HOG_HIT_THRESHOLD = 0.0
HOG_GROUP_THRESHOLD = 2.0

# Haar cascade (haarcascade_frontalface_default.xml from cv2.data, OpenCV 4.x).
# Pyramid steps of 1.1, faces of at least 30 x 30 pixels, and at least 5
# overlapping hits per face, because fewer admit false positives on textured
# backgrounds.
HAAR_CASCADE = "haarcascade_frontalface_default.xml"
HAAR_SCALE_FACTOR = 1.1
HAAR_MIN_NEIGHBORS = 5
HAAR_MIN_SIZE = (30, 30)


def _check_frame(chunk: DecodedChunk) -> np.ndarray:
    image = chunk.data
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        described = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"frame is a {described}, expected an H x W x 3 uint8 BGR image")
    return image


class _OpenCvDetector(Model):
    """Frame checks, batching and results shared by the detectors. Subclasses detect objects in one frame."""

    label = ""

    def __init__(self, config: ModelConfig, description: str) -> None:
        self.info = ModelInfo(
            name=config.name,
            modality=pb.MODALITY_VIDEO,
            description=config.description or description,
            labels=(self.label,),
        )
        # Detector objects are not documented as safe to share between
        # threads (CascadeClassifier keeps scratch buffers), so each worker
        # thread builds its own.
        self._local = threading.local()

    def load(self, device: str) -> None:
        if device != "cpu":
            logger.warning("model %s runs OpenCV on the CPU; device %s is not used", self.info.name, device)
        cv2.setNumThreads(1)
        self._detector()

    def preprocess(self, state: Any, chunk: DecodedChunk) -> list[ModelInput]:
        image = self._prepare(_check_frame(chunk))
        sequence_number = chunk.sequence_number
        return [ModelInput(image, sequence_number, sequence_number, sequence_number, chunk.start_time, chunk.start_time)]

    def run_batch(self, inputs: Sequence[ModelInput], states: Sequence[Any]) -> list[Any]:
        detector = self._detector()
        return [self._detect(detector, item.data) for item in inputs]

    def postprocess(
        self, state: Any, item: ModelInput, output: tuple[np.ndarray, np.ndarray], options: StreamOptions
    ) -> list[pb.StreamResult]:
        boxes, scores = output
        height, width = item.data.shape[:2]
        detections = pb.Detections(frame_width=width, frame_height=height)
        for (x, y, box_width, box_height), score in zip(boxes.tolist(), scores.tolist()):
            detections.detections.add(
                label=self.label,
                score=score,
                box=pb.BoundingBox(x=x, y=y, width=box_width, height=box_height),
            )
        return [final_result(item, detections=detections)]

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (boxes as N x 4 x, y, width, height; scores) for one BGR frame."""
        return self._detect(self._detector(), self._prepare(image))

    def _detector(self) -> Any:
        detector = getattr(self._local, "detector", None)
        if detector is None:
            detector = self._local.detector = self._new_detector()
        return detector

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        return image

    def _new_detector(self) -> Any:
        raise NotImplementedError

    def _detect(self, detector: Any, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class HogPeopleDetector(_OpenCvDetector):
    """People (standing pedestrians) with OpenCV's HOG descriptor and its default linear SVM."""

    label = "person"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(
            config,
            "OpenCV HOG + linear SVM pedestrian detector; label person; score is the SVM margin "
            "(0 at the decision boundary, typically 0 to 3, higher is more confident); "
            "people smaller than about 48 x 96 pixels are missed",
        )

    def _new_detector(self) -> Any:
        hog = cv2.HOGDescriptor()
        hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
        return hog

    def _detect(self, detector: Any, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        height, width = image.shape[:2]
        if height < HOG_WINDOW_HEIGHT or width < HOG_WINDOW_WIDTH:
            # No person fits in a frame smaller than the detection window, and
            # OpenCV 4.x's detectMultiScale crashes the process on such frames
            # (a 64 x 64 frame segfaults).
            return np.zeros((0, 4), dtype=np.int32), np.zeros(0, dtype=np.float64)
        boxes, weights = detector.detectMultiScale(
            image,
            hitThreshold=HOG_HIT_THRESHOLD,
            winStride=HOG_WIN_STRIDE,
            padding=HOG_PADDING,
            scale=HOG_SCALE,
            groupThreshold=HOG_GROUP_THRESHOLD,
        )
        return np.asarray(boxes, dtype=np.int32).reshape(-1, 4), np.asarray(weights, dtype=np.float64).reshape(-1)


class HaarFaceDetector(_OpenCvDetector):
    """Frontal faces with OpenCV's Viola-Jones Haar cascade."""

    label = "face"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(
            config,
            "OpenCV Haar cascade frontal face detector; label face; score is the cascade's last-stage "
            "weight (detectMultiScale3 level weight), unbounded, higher is more confident, about 5 for "
            "clear frontal faces; faces smaller than 30 x 30 pixels are missed",
        )

    def _new_detector(self) -> Any:
        path = cv2.data.haarcascades + HAAR_CASCADE
        cascade = cv2.CascadeClassifier(path)
        if cascade.empty():
            raise RuntimeError(f"failed to load the Haar cascade {path}; opencv-python 4.x ships it in cv2.data")
        return cascade

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        # Grey and equalized, as the cascade was trained; done in the decode pool.
        return cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))

    def _detect(self, detector: Any, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boxes, _, level_weights = detector.detectMultiScale3(
            image,
            scaleFactor=HAAR_SCALE_FACTOR,
            minNeighbors=HAAR_MIN_NEIGHBORS,
            minSize=HAAR_MIN_SIZE,
            outputRejectLevels=True,
        )
        return np.asarray(boxes, dtype=np.int32).reshape(-1, 4), np.asarray(level_weights, dtype=np.float64).reshape(-1)
