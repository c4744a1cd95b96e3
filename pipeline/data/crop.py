"""The crop rule: which pixels of a photo the models see. One rule for training, inference and the gate.

    box     the fixed fractional box `data.crop.box` of every image (the competition's centred portraits)
    detect  the face box the faces stage found, grown by `data.crop.margin` (a share of the box's width
            on the left and right, of its height above and below, so the chin and the mask below it
            stay in: face-only crops lowered a top team's score), widened or heightened to the model's
            input aspect ratio, moved inside the image and clipped to it; an image with no face found
            takes the fixed box

numpy and OpenCV only: the torch-free gate runtime crops with this module too.
"""
from __future__ import annotations

import cv2
import numpy as np

MODES = ("box", "detect")
FINDERS = ("mtcnn", "blazeface")  # faces.finder: pipeline/data/mtcnn.py, pipeline/data/blazeface.py
# which face crops a training photo (pipeline/data/faces.py: choose_faces)
PERSON_BOX = ("own", "normal", "fill")


def crop_rule(cfg: dict) -> dict:
    """Everything that decides a crop, as recorded in every artifact (and a bundle): mode, box, size, and
    the margin in detect mode (in box mode it crops nothing, so changing it must not re-crop)."""
    crop = cfg["data"]["crop"]
    rule = {"mode": crop["mode"], "box": list(crop["box"]), "size": list(cfg["data"]["image_size"])}
    return {**rule, "margin": list(crop["margin"])} if crop["mode"] == "detect" else rule


def fixed_box(width: int, height: int, fractions) -> tuple[int, int, int, int]:
    """The fractional box (x0, y0, x1, y1) in whole pixels of a width x height image."""
    x0, y0, x1, y1 = fractions
    return (int(round(x0 * width)), int(round(y0 * height)), int(round(x1 * width)), int(round(y1 * height)))


def face_crop_box(face, width: int, height: int, margin, size) -> tuple[int, int, int, int]:
    """The crop around a face box (x0, y0, x1, y1, source pixels): margins (left, top, right, bottom, as
    shares of the face's width and height), then the input's aspect (w / h of `size`) by growing the short
    side about the centre, then shifted inside the image; clipped only where it is larger than the image."""
    x0, y0, x1, y1 = (float(v) for v in face)
    face_w, face_h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    left, top, right, bottom = margin
    x0, x1 = x0 - left * face_w, x1 + right * face_w
    y0, y1 = y0 - top * face_h, y1 + bottom * face_h
    aspect = size[0] / size[1]
    crop_w, crop_h = x1 - x0, y1 - y0
    if crop_w / crop_h < aspect:
        grow = crop_h * aspect - crop_w
        x0, x1 = x0 - grow / 2, x1 + grow / 2
    else:
        grow = crop_w / aspect - crop_h
        y0, y1 = y0 - grow / 2, y1 + grow / 2
    x0, x1 = _inside(x0, x1, width)
    y0, y1 = _inside(y0, y1, height)
    box = (int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1)))
    return (max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height))


def _inside(low: float, high: float, limit: int) -> tuple[float, float]:
    """Shift [low, high) into [0, limit) keeping its length; clip it where it is longer than the image."""
    if high - low >= limit:
        return 0.0, float(limit)
    if low < 0:
        return 0.0, high - low
    if high > limit:
        return limit - (high - low), float(limit)
    return low, high


def crop_box(width: int, height: int, rule: dict, face=None) -> tuple[int, int, int, int]:
    """The crop of one image under `rule` (crop_rule's dict): the face's crop in detect mode, else the fixed box."""
    if rule["mode"] == "detect" and face is not None:
        return face_crop_box(face, width, height, rule["margin"], rule["size"])
    return fixed_box(width, height, rule["box"])


def crop_and_resize(image: np.ndarray, box, size) -> np.ndarray:
    """The pixels of `box` (whole-pixel x0, y0, x1, y1), resized to `size` (w, h)."""
    x0, y0, x1, y1 = box
    return cv2.resize(image[y0:y1, x0:x1], tuple(size), interpolation=cv2.INTER_AREA)
