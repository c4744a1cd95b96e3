"""MTCNN with onnxruntime, numpy and OpenCV: facenet-pytorch's detector, without torch at run time.

Why by hand: facenet-pytorch's detection pipeline (image pyramid, three networks, box regression, NMS)
is written in torch, and the gate's runtime must run where torch is not installed. Its three small
networks are exported to ONNX once, from the weights inside the facenet-pytorch wheel (`export_nets`,
the only part that imports torch); `Detector` is the glue, step for step facenet's `detect_face` (the
same thresholds, pyramid factor, regressions and NMS, and torch's "area" resampling, which is adaptive
average pooling, from one integral image; tests/test_faces.py checks the boxes against facenet-pytorch's).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

THRESHOLDS = (0.6, 0.7, 0.7)  # facenet-pytorch's defaults for its P-, R- and O-net
FACTOR = 0.709                # pyramid step
NETS = ("pnet", "rnet", "onet")
LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


def export_nets(folder) -> dict[str, Path]:
    """Write pnet.onnx, rnet.onnx and onet.onnx into `folder` from facenet-pytorch's packaged weights
    (once: existing files are kept). The export is deterministic, so the files are the same each time."""
    from pipeline.io import atomic_write_bytes

    folder = Path(folder)
    paths = {name: folder / f"{name}.onnx" for name in NETS}
    if all(path.exists() for path in paths.values()):
        return paths
    import torch
    from facenet_pytorch import ONet, PNet, RNet

    shapes = {"pnet": (1, 3, 64, 80), "rnet": (2, 3, 24, 24), "onet": (2, 3, 48, 48)}
    axes = {"pnet": {0: "batch", 2: "height", 3: "width"}, "rnet": {0: "batch"}, "onet": {0: "batch"}}
    outputs = {"pnet": ["regression", "probability"], "rnet": ["regression", "probability"],
               "onet": ["regression", "landmarks", "probability"]}
    for name, net in (("pnet", PNet()), ("rnet", RNet()), ("onet", ONet())):
        buffer = io.BytesIO()
        torch.onnx.export(net.eval(), torch.zeros(shapes[name]), buffer, input_names=["image"],
                          output_names=outputs[name], opset_version=17, dynamo=False,
                          dynamic_axes={"image": axes[name], **{out: {0: "batch"} for out in outputs[name]}})
        atomic_write_bytes(paths[name], buffer.getvalue())
    return paths


def _bins(offset: int, size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Torch's adaptive-average-pooling bins (interpolate mode="area"): output i averages input pixels
    floor(i*in/out) .. ceil((i+1)*in/out) - 1, here shifted by `offset`."""
    i = np.arange(size_out)
    return offset + (i * size_in) // size_out, offset + -(-((i + 1) * size_in) // size_out)


class _Integral:
    """Sums of any pixel rectangle of one image in four lookups, so every pyramid level and every patch is
    resampled exactly as torch's area mode does, without resampling the image again for each."""

    def __init__(self, image: np.ndarray):
        height, width, channels = image.shape
        kind = np.int32 if height * width * 255 < 2 ** 31 else np.int64  # integers: exact sums
        self.columns = np.zeros((height + 1, width, channels), kind)  # running sums down each column
        np.cumsum(image, axis=0, dtype=kind, out=self.columns[1:])
        self.sums = np.zeros((height + 1, width + 1, channels), kind)
        np.cumsum(self.columns[1:], axis=1, dtype=kind, out=self.sums[1:, 1:])

    def resize(self, height: int, width: int) -> np.ndarray:
        """The whole image resampled to height x width, float32: rows first, then columns (separable)."""
        top, bottom = _bins(0, self.columns.shape[0] - 1, height)
        left, right = _bins(0, self.columns.shape[1], width)
        rows = self.columns[bottom] - self.columns[top]  # (height, W, 3): each output row's input rows summed
        across = np.zeros((height, rows.shape[1] + 1, rows.shape[2]), rows.dtype)
        np.cumsum(rows, axis=1, out=across[:, 1:])
        total = across[:, right] - across[:, left]
        count = ((bottom - top)[:, None] * (right - left)[None, :])[..., None]
        return (total / count).astype(np.float32)

    def patches(self, boxes: np.ndarray, size: int) -> np.ndarray:
        """(n, size, size, 3): each integer box (y0, x0, y1, x1) resampled to size x size, in one gather."""
        y0, x0, y1, x1 = (boxes[:, k:k + 1] for k in range(4))
        i = np.arange(size)[None]
        top, bottom = y0 + (i * (y1 - y0)) // size, y0 + -(-((i + 1) * (y1 - y0)) // size)
        left, right = x0 + (i * (x1 - x0)) // size, x0 + -(-((i + 1) * (x1 - x0)) // size)
        return self._mean(top, bottom, left, right)

    def _mean(self, top, bottom, left, right) -> np.ndarray:
        s = self.sums
        rows_b, rows_t = bottom[:, :, None], top[:, :, None]
        cols_r, cols_l = right[:, None, :], left[:, None, :]
        total = s[rows_b, cols_r] - s[rows_t, cols_r] - s[rows_b, cols_l] + s[rows_t, cols_l]
        count = ((bottom - top)[:, :, None] * (right - left)[:, None, :])[..., None]
        return (total / count).astype(np.float32)


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, method: str = "union") -> np.ndarray:
    """Indices kept, best first. union: torchvision's nms (IoU without the +1 pixel); min: facenet's
    nms_numpy 'Min' (overlap over the smaller box, +1 pixel areas), as each stage of detect_face uses."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    plus = 1.0 if method == "min" else 0.0
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + plus) * (y2 - y1 + plus)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + plus)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + plus)
        inter = w * h
        overlap = inter / np.minimum(area[i], area[rest]) if method == "min" else inter / (area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.array(keep, np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """facenet's rerec: each box made square about its centre, on its longer side."""
    boxes = boxes.copy()
    h, w = boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]
    side = np.maximum(w, h)
    boxes[:, 0] += w * 0.5 - side * 0.5
    boxes[:, 1] += h * 0.5 - side * 0.5
    boxes[:, 2] = boxes[:, 0] + side
    boxes[:, 3] = boxes[:, 1] + side
    return boxes


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """facenet's bbreg: move each edge by its regression times the box's size (+1 pixel)."""
    boxes = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    boxes[:, :4] += reg[:, :4] * np.stack([w, h, w, h], axis=1)
    return boxes


def _patches(integral: _Integral, height: int, width: int, boxes: np.ndarray,
             size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each box's pixels (clipped to the image as facenet's pad does), resized to size x size and scaled
    as the networks expect; and which boxes had any pixels."""
    ints = np.trunc(boxes[:, :4]).astype(np.int64)
    x = np.maximum(ints[:, 0], 1)
    y = np.maximum(ints[:, 1], 1)
    ex = np.minimum(ints[:, 2], width)
    ey = np.minimum(ints[:, 3], height)
    valid = (ey > y - 1) & (ex > x - 1)
    rectangles = np.stack([y - 1, x - 1, ey, ex], axis=1)[valid]
    batch = integral.patches(rectangles, size) if len(rectangles) else np.zeros((0, size, size, 3), np.float32)
    return ((batch - 127.5) * 0.0078125).transpose(0, 3, 1, 2).astype(np.float32), valid


class Detector:
    """facenet-pytorch's MTCNN.detect on one RGB image at a time, with its networks in onnxruntime."""

    def __init__(self, nets: dict, min_face_px: float, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.sessions = {name: ort.InferenceSession(str(nets[name]), options, providers=["CPUExecutionProvider"])
                         for name in NETS}
        self.min_face = float(min_face_px)

    def _run(self, name: str, batch: np.ndarray) -> list[np.ndarray]:
        return self.sessions[name].run(None, {"image": batch})

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes (n, 4) x0, y0, x1, y1; scores (n,); landmarks (n, 5, 2)) in the image's pixels."""
        height, width = image.shape[:2]
        integral = _Integral(np.asarray(image))
        scale = 12.0 / self.min_face
        shortest = min(height, width) * scale
        scales = []
        while shortest >= 12:
            scales.append(scale)
            scale *= FACTOR
            shortest *= FACTOR
        candidates = []
        for scale in scales:  # first stage: P-net over the pyramid, NMS within each scale
            resized = integral.resize(int(height * scale + 1), int(width * scale + 1))
            reg, prob = self._run("pnet", ((resized - 127.5) * 0.0078125).transpose(2, 0, 1)[None].astype(np.float32))
            found = _cells(reg[0], prob[0, 1], scale, THRESHOLDS[0])
            candidates.append(found[_nms(found[:, :4], found[:, 4], 0.5)])
        boxes = np.concatenate(candidates) if candidates else np.zeros((0, 9), np.float32)
        boxes = boxes[_nms(boxes[:, :4], boxes[:, 4], 0.7)]
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = np.stack([boxes[:, 0] + boxes[:, 5] * w, boxes[:, 1] + boxes[:, 6] * h,
                          boxes[:, 2] + boxes[:, 7] * w, boxes[:, 3] + boxes[:, 8] * h, boxes[:, 4]], axis=1)
        boxes = _square(boxes)
        if len(boxes):  # second stage: R-net on 24x24 patches
            patches, valid = _patches(integral, height, width, boxes, 24)
            boxes = boxes[valid]
            reg, prob = self._run("rnet", patches)
            passed = prob[:, 1] > THRESHOLDS[1]
            boxes = np.concatenate([boxes[passed, :4], prob[passed, 1:2]], axis=1)
            reg = reg[passed]
            pick = _nms(boxes[:, :4], boxes[:, 4], 0.7)
            boxes = _square(_regress(boxes[pick], reg[pick]))
        points = np.zeros((0, 5, 2), np.float32)
        if len(boxes):  # third stage: O-net on 48x48 patches, with the landmarks
            patches, valid = _patches(integral, height, width, boxes, 48)
            boxes = boxes[valid]
            reg, marks, prob = self._run("onet", patches)
            passed = prob[:, 1] > THRESHOLDS[2]
            boxes = np.concatenate([boxes[passed, :4], prob[passed, 1:2]], axis=1)
            reg, marks = reg[passed], marks[passed]
            w, h = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
            points = np.stack([w[:, None] * marks[:, :5] + boxes[:, 0:1] - 1,
                               h[:, None] * marks[:, 5:10] + boxes[:, 1:2] - 1], axis=2)
            boxes = _regress(boxes, reg)
            pick = _nms(boxes[:, :4], boxes[:, 4], 0.7, "min")
            boxes, points = boxes[pick], points[pick]
        return boxes[:, :4].astype(np.float64), boxes[:, 4].astype(np.float64), points.astype(np.float64)


def _cells(reg: np.ndarray, prob: np.ndarray, scale: float, threshold: float) -> np.ndarray:
    """facenet's generateBoundingBox: each P-net cell over the threshold as a 12x12 box in image pixels,
    with its score and its four regressions."""
    rows, cols = np.nonzero(prob >= threshold)
    cells = np.stack([cols, rows], axis=1).astype(np.float32)
    low = np.floor((2 * cells + 1) / scale)
    high = np.floor((2 * cells + 12) / scale)
    return np.concatenate([low, high, prob[rows, cols][:, None], reg[:, rows, cols].T], axis=1).astype(np.float32)


# ---------------------------------------------------------------- the one face-finding rule

@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in source pixels
    score: float
    landmarks: tuple[tuple[float, float], ...]  # left eye, right eye, nose, mouth left, mouth right: (x, y)

    @property
    def area(self) -> float:
        return max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0)


_DETECTORS: dict = {}


def detector(nets_folder, min_face_px: float, threads: int = 1) -> Detector:
    """One Detector per process, nets folder, smallest face and thread count, built on first use."""
    key = (str(nets_folder), round(float(min_face_px), 3), threads)
    if key not in _DETECTORS:
        nets = {name: Path(nets_folder) / f"{name}.onnx" for name in NETS}
        _DETECTORS[key] = Detector(nets, max(float(min_face_px), 12.0), threads)
    return _DETECTORS[key]


def find_faces(image: np.ndarray, nets_folder, detect_scale: float, min_face: float, min_score: float,
               threads: int = 1) -> list[Face]:
    """Every face in an RGB uint8 image scoring at least `min_score`, best first, in the image's pixels:
    the image is shrunk by `detect_scale` first and the boxes scaled back; `min_face` is in source pixels."""
    import cv2

    height, width = image.shape[:2]
    small = image if detect_scale == 1 else cv2.resize(
        image, (max(round(width * detect_scale), 1), max(round(height * detect_scale), 1)), interpolation=cv2.INTER_AREA)
    boxes, scores, points = detector(nets_folder, min_face * detect_scale, threads).detect(small)
    faces = [Face(tuple(float(v) / detect_scale for v in box), float(score),
                  tuple((float(x) / detect_scale, float(y) / detect_scale) for x, y in point))
             for box, score, point in zip(boxes, scores, points) if score >= min_score]
    return sorted(faces, key=lambda face: -face.score)
