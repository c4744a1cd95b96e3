"""Demo dataset: synthetic people rendered in the competition layout.

    <synth.out>/train/train.csv                 id,gender,race,age,path (labels as recorded, noise included)
    <synth.out>/train/images/<path>/<stem>.<ext> mask1..mask5, incorrect_mask, normal (.jpg/.jpeg/.png)
    <synth.out>/eval/info.csv                   ImageID,ans (ans all 0, rows shuffled)
    <synth.out>/eval/images/<40 hex>.jpg
    <synth.out>/eval_answers.csv                ImageID,ans,mask,gender,age_band: held out, only the demo summary reads it
    <synth.out>/label_fixes.csv                 the 'known' half of the mislabeled people, as label fixes
    <synth.out>/synth.json                      the stamp (written last): counts, config, seed, commit, key, the mislabeled people

Every person is drawn from their own random stream seeded by (seed, stream, person index), so the
files are byte-identical across reruns and whatever the number of workers, and the first N people
of a bigger run are the same N people.

What the images carry (drawn with OpenCV polygons, no assets):
  identity (kept over a person's 7 images): skin, face shape and width, eye spacing, hair colour,
    style and length, glasses, clothes, background;
  mask: worn covers nose and mouth; incorrect sits below the nose or on the chin; not worn shows both;
    five mask styles per person (colour, shape, plain / stripes / dots);
  gender: overlapping cues (hair length in a probabilistic mix, face width, brows, beard shadow, lipstick);
  age: continuous cues (grey share of the hair, forehead lines, crow's feet, folds), so 57 and 60 look alike;
  nuisances per image: pose (shift, rotation), scale, lighting, colour cast, blur, noise, JPEG quality 70..95.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np

from pipeline.artifacts import Artifact
from pipeline.data import layout
from pipeline.errors import MaskfoldError
from pipeline.io import atomic_write_bytes, atomic_write_text, parallel
from pipeline.labels import GENDER_NAMES, IMAGE_STEMS, OFFICIAL_OLD, age_band, class_index, mask_of

# Bump when the renderer or the sampling changes: it is part of the config hash, so old output is redone.
SYNTH_VERSION = 2  # 2: planted incorrect_mask/normal swaps (synth.mask_swaps)

# Number of people of each age 18, 19, ..., 60 in the real competition metadata
# (../shared/data/real_meta/train.csv, 2,700 people), counted once by hand. That file is never read here.
REAL_AGE_COUNTS = (
    192, 407, 267, 41, 58, 72, 62, 82, 44, 15,   # 18..27
    25, 16, 17, 3, 7, 5, 13, 19, 8, 3,           # 28..37
    14, 6, 20, 7, 13, 18, 13, 27, 14, 10,        # 38..47
    39, 31, 80, 63, 78, 64, 82, 100, 123, 106,   # 48..57
    159, 85, 192,                                # 58..60 (60 is the top: the real data has no one older)
)
AGES = np.arange(18, 18 + len(REAL_AGE_COUNTS))
AGE_P = np.asarray(REAL_AGE_COUNTS, dtype=np.float64) / sum(REAL_AGE_COUNTS)
AGE_CDF = np.cumsum(AGE_P)
FEMALE_SHARE = 1655 / 2700        # same file: 1,655 female, 1,045 male
RACE = "Asian"                    # same file: every person is Asian
SUFFIX_SHARE = 0.03               # ids like 000600-1 (same number as the person before, another person)
MEAN_ID_GAP = 2.6                 # the real ids run 000001..006959 over 2,700 people
EXTENSIONS = (".jpg", ".png", ".jpeg")
EXTENSION_P = (0.90, 0.06, 0.04)  # chosen per person; a few folders mix two extensions
MIXED_FOLDER_SHARE = 0.03

# Independent random streams: (seed, stream, person index).
_TRAIN_LABELS, _TRAIN_LOOKS, _EVAL_LABELS, _EVAL_LOOKS, _NOISE, _SHUFFLE, _SWAPS = range(7)

# Canonical drawing frame (w, h); every coordinate below is in it and mapped to synth.image_size.
_CW, _CH = 384.0, 512.0
_CX, _CY = 192.0, 228.0           # face centre


# --------------------------------------------------------------------------- labels

def sample_people(seed: int, n: int, kind: str = "train") -> list[dict]:
    """True labels of n people: gender (0 male, 1 female) and age; train people also get an id.

    Person i depends only on (seed, kind, i)."""
    if kind not in ("train", "eval"):
        raise ValueError(f"kind must be 'train' or 'eval', got {kind!r}")
    stream = _TRAIN_LABELS if kind == "train" else _EVAL_LABELS
    people, number, previous_suffix = [], 0, True
    for index in range(n):
        rng = np.random.default_rng([seed, stream, index])
        gender = int(rng.random() < FEMALE_SHARE)
        age = int(AGES[min(int(np.searchsorted(AGE_CDF, rng.random(), side="right")), len(AGES) - 1)])
        gap = int(rng.geometric(1.0 / MEAN_ID_GAP))
        suffix = bool(rng.random() < SUFFIX_SHARE)
        person = {"index": index, "gender": gender, "age": age}
        if kind == "train":
            if suffix and not previous_suffix:
                person["id"] = f"{number:06d}-1"
            else:
                number += gap
                person["id"] = f"{number:06d}"
            previous_suffix = person["id"].endswith("-1")
        people.append(person)
    return people


def choose_label_noise(people: list[dict], share: float, seed: int) -> dict[int, dict]:
    """Which train people get a wrong gender or a wrong age (in another official age band) on record."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"synth.label_noise must be in [0, 1], got {share}")
    count = int(round(share * len(people)))
    rng = np.random.default_rng([seed, _NOISE])
    chosen = np.sort(rng.choice(len(people), size=count, replace=False)) if count else []
    noise = {}
    for index in chosen:
        person = people[int(index)]
        if rng.random() < 0.5:
            true, recorded = GENDER_NAMES[person["gender"]], GENDER_NAMES[1 - person["gender"]]
            noise[int(index)] = {"id": person["id"], "field": "gender", "true": true, "recorded": recorded}
        else:
            other = age_band(AGES, OFFICIAL_OLD) != age_band(person["age"], OFFICIAL_OLD)
            p = AGE_P * other
            recorded = int(rng.choice(AGES, p=p / p.sum()))
            noise[int(index)] = {"id": person["id"], "field": "age", "true": person["age"], "recorded": recorded}
    return noise


SWAPPED = ("incorrect_mask", "normal")  # the swap this data is known for: each photo saved under the other's name


def choose_mask_swaps(people: list[dict], share: float, seed: int, taken) -> dict[int, dict]:
    """Which train people's incorrect_mask and normal photos are saved under each other's names (never a person
    whose gender or age is already wrong: one planted error per person)."""
    free = [i for i in range(len(people)) if i not in taken]
    count = min(int(round(share * len(people))), len(free))
    rng = np.random.default_rng([seed, _SWAPS])
    chosen = np.sort(rng.choice(free, size=count, replace=False)) if count else []
    value = ":".join(SWAPPED)
    return {int(i): {"id": people[int(i)]["id"], "field": "swap_mask", "true": value, "recorded": value}
            for i in chosen}


# --------------------------------------------------------------------------- drawing helpers

def _ellipse(cx, cy, ax, ay, a0=0.0, a1=360.0, n=32) -> np.ndarray:
    t = np.radians(np.linspace(a0, a1, n))
    return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], axis=1)


def _rgb(values) -> tuple:
    """An RGB colour as the BGR tuple OpenCV draws with (images are BGR from drawing to encoding)."""
    r, g, b = (min(255, max(0, int(round(float(v))))) for v in values)
    return b, g, r


def _mix(a, b, t) -> np.ndarray:
    return (1.0 - t) * np.asarray(a, dtype=np.float64) + t * np.asarray(b, dtype=np.float64)


class _Canvas:
    """Draws canonical-frame shapes through one affine map (pose, scale, output size), anti-aliased."""

    def __init__(self, image: np.ndarray, matrix: np.ndarray, thickness_scale: float):
        self.image, self.matrix, self.thickness_scale = image, matrix, thickness_scale

    def points(self, pts) -> np.ndarray:
        pts = np.asarray(pts, dtype=np.float64)
        return pts @ self.matrix[:, :2].T + self.matrix[:, 2]

    def _fixed(self, pts) -> np.ndarray:
        return np.round(self.points(pts) * 16.0).astype(np.int32)

    def fill(self, pts, color) -> None:
        cv2.fillPoly(self.image, [self._fixed(pts)], _rgb(color), cv2.LINE_AA, 4)

    def line(self, pts, color, thickness, closed=False) -> None:
        width = max(1, int(round(thickness * self.thickness_scale)))
        cv2.polylines(self.image, [self._fixed(pts)], closed, _rgb(color), width, cv2.LINE_AA, 4)


# --------------------------------------------------------------------------- identity

_HAIR_BASES = ((22, 18, 16), (35, 26, 20), (48, 34, 24), (28, 24, 24), (70, 48, 30), (105, 70, 42))
_HAIR_BASE_P = (0.34, 0.28, 0.16, 0.12, 0.07, 0.03)
_GREY = (196, 196, 192)
_WHITE_HAIR = (225, 225, 220)


def _face_half_width(ident: dict, dy: float) -> float:
    """Half width of the face contour at dy below the face centre (negative above)."""
    a, b, p, taper = ident["a"], ident["b"], ident["p"], ident["taper"]
    r = min(abs(dy) / b, 1.0)
    width = a * (1.0 - r ** p) ** (1.0 / p)
    if dy > 0:
        width *= 1.0 - taper * r * r
    return width


def _identity(rng: np.random.Generator, female: int, age: int) -> dict:
    male = 1 - female
    ident = {"female": female, "age": age}
    skin_t = rng.beta(2.2, 2.2)
    ident["skin"] = _mix((242, 212, 188), (182, 134, 104), skin_t) + rng.normal(0, 4, 3)
    ident["a"] = float(np.clip(73 + 6 * male + rng.normal(0, 3.5), 62, 90))
    ident["b"] = float(np.clip(97 + 2 * male + rng.normal(0, 4.5), 86, 110))
    ident["p"] = float(rng.uniform(2.0, 2.6) + 0.35 * male)
    ident["taper"] = float(rng.uniform(0.16, 0.34) - 0.05 * male)
    ident["eye_dx"] = float(rng.uniform(27, 36))
    ident["eye_y"] = float(rng.uniform(-16, -8))
    ident["mouth_w"] = float(rng.uniform(14, 20))

    # Age: the grey share of the hair and the lines grow smoothly with age, with a personal rate.
    years = max(age - 27, 0) / 33.0
    ident["grey"] = float(np.clip(years ** 1.15 * rng.uniform(0.6, 1.25), 0.0, 0.95))
    ident["lines"] = float(np.clip(max(age - 21, 0) / 39.0 * rng.uniform(0.7, 1.2), 0.0, 1.0))
    base = np.asarray(_HAIR_BASES[rng.choice(len(_HAIR_BASES), p=_HAIR_BASE_P)], dtype=np.float64)
    ident["hair"] = _mix(base, _GREY, 0.8 * ident["grey"])
    ident["brow"] = _mix(base, _GREY, 0.45 * ident["grey"])
    n_strands = int(round(60 * ident["grey"]))
    ident["strands"] = [(rng.uniform(-1, 1), rng.uniform(0.15, 1.0), rng.uniform(-0.25, 0.25)) for _ in range(n_strands)]

    # Gender: overlapping cues.
    style_p = (0.15, 0.25, 0.60) if female else (0.80, 0.14, 0.06)
    ident["hair_len"] = ("short", "medium", "long")[rng.choice(3, p=style_p)]
    ident["long_extra"] = float(rng.uniform(20, 120))
    ident["volume"] = float(rng.uniform(8, 22))
    ident["bangs"] = bool(rng.random() < (0.40 if female else 0.25))
    recede = male * max(age - 35, 0) / 25.0 * rng.uniform(0, 1)
    ident["hairline"] = float(rng.uniform(-72, -64) - 14 * recede)
    ident["part"] = float(rng.uniform(-0.5, 0.5))
    ident["brow_t"] = float(rng.uniform(5.0, 7.0) if male else rng.uniform(3.0, 5.0))
    ident["beard"] = bool(male and rng.random() < 0.35)
    ident["lipstick"] = bool(female and rng.random() < 0.45)
    ident["lip"] = (_mix(ident["skin"] * np.array([0.88, 0.62, 0.62]), (190, 45, 70), rng.uniform(0.5, 0.9))
                    if ident["lipstick"] else ident["skin"] * np.array([0.86, 0.66, 0.64]))
    ident["glasses"] = bool(rng.random() < 0.12)
    ident["glasses_color"] = _rgb(rng.choice([(25, 25, 25), (90, 60, 40), (150, 150, 155)]))

    # Lines: positions fixed for the person, darkness and count from ident["lines"].
    ident["forehead"] = [(rng.uniform(0.15, 0.9), rng.uniform(0.45, 0.8), rng.uniform(2, 6)) for _ in range(4)]
    ident["spots"] = [(rng.uniform(-1, 1), rng.uniform(-1, 1)) for _ in range(6)]

    # Surroundings.
    if rng.random() < 0.8:
        ident["background"] = rng.uniform(175, 240) + rng.normal(0, 8, 3)
    else:
        ident["background"] = rng.uniform(60, 200, 3)
    ident["props"] = [(rng.uniform(0, _CW), rng.uniform(0, _CH), rng.uniform(30, 140), rng.uniform(60, 300),
                       ident["background"] * rng.uniform(0.75, 1.15)) for _ in range(int(rng.integers(0, 3)))]
    ident["clothes"] = rng.uniform(20, 230, 3)
    ident["collar"] = float(rng.uniform(10, 40))
    return ident


_MASK_COLORS = (
    (236, 236, 232), (150, 198, 228), (30, 30, 34), (140, 140, 144), (42, 52, 92),
    (232, 176, 192), (222, 206, 180), (120, 160, 120),
)
_MASK_COLOR_P = (0.24, 0.22, 0.18, 0.10, 0.08, 0.07, 0.06, 0.05)


def _mask_style(rng: np.random.Generator) -> dict:
    color = np.asarray(_MASK_COLORS[rng.choice(len(_MASK_COLORS), p=_MASK_COLOR_P)], dtype=np.float64)
    color = np.clip(color + rng.normal(0, 6, 3), 0, 255)
    pattern = ("plain", "stripes", "dots")[rng.choice(3, p=(0.6, 0.2, 0.2))]
    second = rng.uniform(0, 255, 3)
    if np.abs(second - color).sum() < 120:
        second = 255 - color
    return {
        "color": color,
        "shape": ("surgical", "kf94", "cloth")[rng.choice(3, p=(0.5, 0.3, 0.2))],
        "pattern": pattern,
        "second": second,
        "period": float(rng.uniform(10, 18)),
        "angle": float(rng.choice([0.0, 45.0, 90.0, -45.0])),
        "dot": float(rng.uniform(2.5, 4.5)),
    }


# --------------------------------------------------------------------------- one image

def _hair_cap(ident: dict, cx: float, cy: float) -> np.ndarray:
    """Top of the head down to the hairline (bangs lower it over the forehead)."""
    a, b = ident["a"], ident["b"]
    top = _ellipse(cx, cy - 6, a + 9, b + ident["volume"], 180, 360, 40)   # left temple -> crown -> right
    hairline_y = cy + (-44 if ident["bangs"] else ident["hairline"])
    side_y = cy - 8
    part = ident["part"] * a * 0.5
    lower = np.array([
        [cx + a + 9, side_y],
        [cx + a * 0.82, side_y - 10],
        [cx + a * 0.55, hairline_y + 6],
        [cx + part, hairline_y - (0 if ident["bangs"] else 4)],
        [cx - a * 0.55, hairline_y + 6],
        [cx - a * 0.82, side_y - 10],
        [cx - a - 9, side_y],
    ])
    return np.vstack([top, lower])


def _draw_person(canvas: _Canvas, ident: dict, placement: str | None, style: dict | None, rng) -> None:
    cx, cy, a, b = _CX, _CY, ident["a"], ident["b"]
    skin = ident["skin"]
    hair = ident["hair"]

    # Long hair falls behind the face and neck.
    if ident["hair_len"] != "short":
        length = 40 if ident["hair_len"] == "medium" else 70 + ident["long_extra"]
        bottom = cy + b * 0.55 + length
        back = np.vstack([
            _ellipse(cx, cy - 6, a + 12, b + ident["volume"], 180, 360, 30),
            [[cx + a + 20, cy + 20], [cx + a + 24, bottom], [cx - a - 24, bottom], [cx - a - 20, cy + 20]],
        ])
        canvas.fill(back, hair * 0.85)

    # Clothes, neck, ears.
    shoulder_y = cy + b + 70
    canvas.fill([[cx - 0.62 * a - 6, cy + b + 40], [cx - 130, shoulder_y], [cx - 200, shoulder_y + 45],
                 [cx - 240, 800], [cx + 240, 800], [cx + 200, shoulder_y + 45], [cx + 130, shoulder_y],
                 [cx + 0.62 * a + 6, cy + b + 40], [cx, cy + b + 40 + ident["collar"]]], ident["clothes"])
    canvas.fill([[cx - 0.58 * a, cy + 30], [cx + 0.58 * a, cy + 30], [cx + 0.62 * a, cy + b + 48],
                 [cx, cy + b + 40 + ident["collar"]], [cx - 0.62 * a, cy + b + 48]], skin * 0.86)
    for side in (-1, 1):
        canvas.fill(_ellipse(cx + side * (a - 1), cy - 2, 10, 19, n=20), skin * 0.92)

    # Face: a superellipse tapering to the chin.
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    fx = a * np.sign(c) * np.abs(c) ** (2 / ident["p"])
    fy = b * np.sign(s) * np.abs(s) ** (2 / ident["p"])
    fx = np.where(fy > 0, fx * (1 - ident["taper"] * (fy / b) ** 2), fx)
    canvas.fill(np.stack([cx + fx, cy + fy], 1), skin)

    if ident["beard"]:
        lower = fy > 32    # contiguous: right cheek -> chin -> left cheek; closed across the upper lip
        canvas.fill(np.stack([cx + fx[lower], cy + fy[lower]], 1), _mix(skin * 0.82, (80, 90, 105), 0.3))

    # Hair on top, with grey strands.
    canvas.fill(_hair_cap(ident, cx, cy), hair)
    if ident["hair_len"] != "short":
        for side in (-1, 1):    # strands framing the face
            reach = cy + (30 if ident["hair_len"] == "medium" else 60)
            canvas.fill([[cx + side * (a + 12), cy - 30], [cx + side * (a - 8), cy - 30],
                         [cx + side * (a - 4), reach], [cx + side * (a + 18), reach + 10]], hair)
    strand_color = _mix(_WHITE_HAIR, hair, 0.25)
    for u, v, bend in ident["strands"]:
        x0 = cx + u * (a + 4)
        y0 = cy - 10 - v * (b + ident["volume"] - 12) * np.sqrt(max(1 - u * u, 0.05))
        canvas.line([[x0, y0], [x0 + bend * 30, y0 + 9], [x0 + bend * 50, y0 + 20]], strand_color, 1.6)

    # Lines of age on the forehead (bangs hide most of them).
    lines = ident["lines"]
    line_color = skin * (0.97 - 0.33 * lines)
    count = int(round(lines * 4.2))
    forehead_top = cy + (-44 if ident["bangs"] else ident["hairline"]) + 8
    for k, (width, height, curve) in enumerate(ident["forehead"][:count]):
        y = cy - 36 - (k + 0.6) * 7.5
        if y < forehead_top:
            break
        half = a * 0.55 * width + 10
        canvas.line([[cx - half, y + curve * 0.5], [cx, y - curve * height], [cx + half, y + curve * 0.5]],
                    line_color, 2.6)

    # Brows, eyes, glasses.
    ey = cy + ident["eye_y"]
    for side in (-1, 1):
        ex = cx + side * ident["eye_dx"]
        canvas.line([[ex - side * 13, ey - 14], [ex, ey - 19], [ex + side * 14, ey - 15]], ident["brow"], ident["brow_t"])
        canvas.fill(_ellipse(ex, ey, 10, 5.5, n=24), (240, 238, 232))
        canvas.fill(_ellipse(ex + rng.uniform(-1.5, 1.5), ey, 4.6, 4.6, n=16), (40, 28, 22))
        canvas.line(_ellipse(ex, ey, 10, 5.5, 180, 360, 12), (35, 25, 20), 3.0 if ident["female"] else 2.0)
        if lines > 0.2:    # crow's feet and under-eye lines
            for k in range(1 + int(lines * 2.5)):
                canvas.line([[ex + side * 12, ey - 2 + 3 * k], [ex + side * 22, ey - 6 + 6 * k]], line_color, 1.8)
            canvas.line(_ellipse(ex, ey + 5, 9, 4, 20, 160, 8), line_color, 1.6)
        if ident["glasses"]:
            frame = np.array([[ex - 16, ey - 10], [ex + 16, ey - 10], [ex + 15, ey + 11], [ex - 15, ey + 11]])
            canvas.line(frame, ident["glasses_color"], 2.4, closed=True)
    if ident["glasses"]:
        canvas.line([[cx - ident["eye_dx"] + 16, ey - 6], [cx + ident["eye_dx"] - 16, ey - 6]], ident["glasses_color"], 2.4)

    # Nose, folds, mouth.
    canvas.line([[cx - 2, cy - 4], [cx + 1, cy + 16]], skin * 0.84, 2.0)
    canvas.fill(_ellipse(cx, cy + 19, 10, 6, n=20), skin * 0.93)
    for side in (-1, 1):
        canvas.fill(_ellipse(cx + side * 6, cy + 24, 3.6, 2.2, n=12), skin * 0.45)
        if lines > 0.35:
            canvas.line([[cx + side * 15, cy + 20], [cx + side * 24, cy + 38], [cx + side * 27, cy + 56]],
                        skin * (1.0 - 0.3 * lines), 2.4)
    for ax_, ay_ in ident["spots"][: int(max(lines - 0.5, 0) * 12)]:
        canvas.fill(_ellipse(cx + ax_ * a * 0.6, cy - 20 + ay_ * 40, 2.5, 2.0, n=10), skin * 0.78)
    mw = ident["mouth_w"]
    canvas.fill(_ellipse(cx, cy + 50, mw, 5.5, n=24), ident["lip"])
    canvas.line([[cx - mw, cy + 50], [cx, cy + 51], [cx + mw, cy + 50]], ident["lip"] * 0.55, 1.6)

    if placement is not None:
        _draw_mask(canvas, ident, placement, style)


def _draw_mask(canvas: _Canvas, ident: dict, placement: str, style: dict) -> None:
    cx, cy, b = _CX, _CY, ident["b"]
    if placement == "worn":          # over the nose bridge down under the chin
        top, bottom, peak = cy - 1, cy + b + 14, 7.0
    elif placement == "below_nose":  # nostrils visible, mouth covered
        top, bottom, peak = cy + 31, cy + b + 20, 2.0
    elif placement == "chin":        # mouth visible, chin covered
        top, bottom, peak = cy + 62, cy + b + 28, 0.0
    else:
        raise ValueError(f"unknown mask placement {placement!r}")
    height = bottom - top
    mid = top + 0.35 * height
    half = max(_face_half_width(ident, top - cy), _face_half_width(ident, mid - cy)) + 6
    if style["shape"] == "kf94":
        half += 4
    bottom_ellipse = _ellipse(cx, mid, half, bottom - mid, 0, 180, 28)          # right -> bottom -> left
    top_edge = np.array([[cx - half, top + 4], [cx - half * 0.5, top], [cx, top - peak],
                         [cx + half * 0.5, top], [cx + half, top + 4]])
    outline = np.vstack([top_edge, [[cx + half, mid]], bottom_ellipse[1:-1], [[cx - half, mid]]])
    color = style["color"]
    canvas.fill(outline, color)

    if style["pattern"] != "plain":
        _pattern_inside(canvas, outline, style)
    edge = color * 0.8
    if style["shape"] == "surgical":
        for f in (0.28, 0.48, 0.68):
            y = top + f * height
            w = half * 0.86 * np.sqrt(max(1 - max(y - mid, 0) ** 2 / (bottom - mid) ** 2, 0.0))
            canvas.line([[cx - w, y], [cx + w, y + 1]], edge, 1.6)
    elif style["shape"] == "kf94":
        canvas.line([[cx - half * 0.95, mid + 2], [cx, mid + 6], [cx + half * 0.95, mid + 2]], edge, 1.6)
    else:
        canvas.line([[cx, top - peak + 2], [cx, bottom - 3]], edge, 1.4)
    loop = (236, 236, 232) if style["shape"] == "surgical" else color * 0.9
    for side in (-1, 1):
        ear = [cx + side * (ident["a"] + 2), cy - 6]
        canvas.line([[cx + side * half, top + 5], ear, [cx + side * half, mid + 0.4 * (bottom - mid)]], loop, 1.8)


def _pattern_inside(canvas: _Canvas, outline: np.ndarray, style: dict) -> None:
    image = canvas.image
    pts = np.round(canvas.points(outline)).astype(np.int32)
    x, y, w, h = cv2.boundingRect(pts)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, image.shape[1]), min(y + h, image.shape[0])
    if x1 <= x0 or y1 <= y0:
        return
    region = image[y0:y1, x0:x1]
    layer = region.copy()
    scale = canvas.thickness_scale
    period = max(style["period"] * scale, 3.0)
    second = _rgb(style["second"])
    if style["pattern"] == "stripes":
        theta = np.radians(style["angle"])
        direction = np.array([np.cos(theta), np.sin(theta)])
        normal = np.array([-direction[1], direction[0]])
        reach = float(np.hypot(x1 - x0, y1 - y0))
        centre = np.array([(x1 - x0) / 2, (y1 - y0) / 2])
        width = max(1, int(round(period * 0.4)))
        for k in np.arange(-reach, reach, period):
            p0 = centre + normal * k - direction * reach
            p1 = centre + normal * k + direction * reach
            cv2.line(layer, tuple(int(v) for v in p0), tuple(int(v) for v in p1), second, width, cv2.LINE_AA)
    else:
        radius = max(1, int(round(style["dot"] * scale)))
        for row, yy in enumerate(np.arange(period / 2, y1 - y0, period)):
            for xx in np.arange(period / 2 + (period / 2) * (row % 2), x1 - x0, period):
                cv2.circle(layer, (int(xx), int(yy)), radius, second, -1, cv2.LINE_AA)
    inside = np.zeros(region.shape[:2], dtype=np.uint8)
    cv2.fillPoly(inside, [pts - np.array([x0, y0], dtype=np.int32)], 255)
    inside = cv2.erode(inside, np.ones((3, 3), np.uint8)) > 0
    region[inside] = layer[inside]


def _render_image(rng: np.random.Generator, ident: dict, placement, style, size) -> np.ndarray:
    """One BGR image of the person: draw, then pose, lighting, blur and noise."""
    width, height = size
    sx, sy = width / _CW, height / _CH
    angle = float(np.clip(rng.normal(0, 4.0), -10, 10))
    scale = float(rng.uniform(0.9, 1.1))
    shift = np.clip(rng.normal(0, 7.0, 2), -16, 16)
    rotation = cv2.getRotationMatrix2D((_CX, _CY), angle, scale)   # canonical -> canonical
    rotation[:, 2] += shift
    matrix = np.diag([sx, sy]) @ rotation

    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = _rgb(ident["background"])
    canvas = _Canvas(image, matrix, (sx + sy) / 2 * scale)
    for px, py, pw, ph, pc in ident["props"]:      # background furniture: does not move with the head
        cv2.rectangle(image, (int(px * sx), int(py * sy)), (int((px + pw) * sx), int((py + ph) * sy)), _rgb(pc), -1)
    _draw_person(canvas, ident, placement, style, rng)

    # Lighting: gain, colour cast, a linear gradient (side light), offset, coarse sensor noise.
    # Both maps are smooth, so they are drawn at a quarter of the size and upsampled.
    small = (max(height // 4, 2), max(width // 4, 2))
    gain = rng.uniform(0.75, 1.2) * rng.uniform(0.94, 1.06, 3)
    gx, gy = rng.uniform(-0.3, 0.3, 2)
    gradient = (1.0 + gx * np.linspace(-0.5, 0.5, small[1])[None, :] + gy * np.linspace(-0.5, 0.5, small[0])[:, None])
    multiply = (gradient[:, :, None] * gain).astype(np.float32)
    noise_std = rng.uniform(0.0, 5.0)
    add = rng.normal(0.0, noise_std, (*small, 3)) + rng.uniform(-12, 12)
    multiply = cv2.resize(multiply, (width, height), interpolation=cv2.INTER_LINEAR)
    add = cv2.resize(add.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    out = cv2.multiply(image, multiply, dtype=cv2.CV_32F)
    cv2.add(out, add, dst=out)
    image = np.clip(out, 0, 255, out=out).astype(np.uint8)
    if rng.random() < 0.3:
        sigma = rng.uniform(0.5, 1.3) * (sx + sy) / 2
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    return image


def _encode(bgr: np.ndarray, extension: str, quality: int) -> bytes:
    ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    if extension != ".png":
        return jpeg.tobytes()
    # Like the real .png files: a JPEG photo saved again losslessly, so the extension tells nothing.
    decoded = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
    ok, png = cv2.imencode(".png", decoded, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()


# --------------------------------------------------------------------------- one person (runs in a worker)

def render_person(seed: int, kind: str, index: int, gender: int, age: int, size, target: str,
                  swapped: bool = False) -> list[dict]:
    """Render and write one person's 7 images; returns one record per image (its true mask).

    train: `target` is the person's folder (train/images/<path>); eval: the eval/images folder. `swapped`: the
    incorrect_mask and normal photos are saved under each other's names (planted label noise)."""
    cv2.setNumThreads(1)
    rng = np.random.default_rng([seed, _TRAIN_LOOKS if kind == "train" else _EVAL_LOOKS, index])
    ident = _identity(rng, gender, age)
    styles = [_mask_style(rng) for _ in range(5)]
    folder = Path(target)
    extension = EXTENSIONS[rng.choice(len(EXTENSIONS), p=EXTENSION_P)] if kind == "train" else ".jpg"
    odd_one = int(rng.integers(len(IMAGE_STEMS))) if kind == "train" and rng.random() < MIXED_FOLDER_SHARE else -1
    records = []
    for k, stem in enumerate(IMAGE_STEMS):
        mask = mask_of(stem)
        if mask == 0:
            placement, style = "worn", styles[int(stem[-1]) - 1]
        elif mask == 1:
            placement = "below_nose" if rng.random() < 0.65 else "chin"
            style = styles[int(rng.integers(5))]
        else:
            placement, style = None, None
        image = _render_image(rng, ident, placement, style, size)
        quality = int(rng.integers(70, 96))
        ext = extension
        if k == odd_one:
            ext = [e for e in EXTENSIONS if e != extension][int(rng.integers(len(EXTENSIONS) - 1))]
        if kind == "train":
            name = f"{SWAPPED[1 - SWAPPED.index(stem)] if swapped and stem in SWAPPED else stem}{ext}"
        else:
            name = f"{rng.bytes(20).hex()}.jpg"
        atomic_write_bytes(folder / name, _encode(image, ext, quality))
        records.append({"name": name, "stem": stem, "mask": mask, "placement": placement or "none"})
    return records


# --------------------------------------------------------------------------- the dataset as an artifact

def synth_artifact(cfg: dict) -> Artifact:
    """The files depend on the synth section less where they go and how many workers, and the version."""
    out = Path(cfg["synth"]["out"])
    section = {k: v for k, v in cfg["synth"].items() if k not in ("out", "workers")}
    return Artifact(what=f"demo dataset {out}", folder=out, stamp_name="synth.json",
                    identity={"synth": section, "version": SYNTH_VERSION}, remedy="./run.sh synth -c CONFIG",
                    outputs=("train/train.csv", "eval/info.csv", layout.HELDOUT_ANSWERS, "label_fixes.csv"))


def _paths(out: Path) -> dict:
    return {
        "out": out,
        "train_csv": out / "train" / "train.csv",
        "train_images": out / "train" / "images",
        "eval_info": out / "eval" / "info.csv",
        "eval_images": out / "eval" / "images",
        "eval_answers": layout.heldout_answers(out),
        "label_fixes": out / "label_fixes.csv",
        "synth_json": out / "synth.json",
    }


_MARKER = ".synth_incomplete"


def prepare_folder(artifact: Artifact) -> None:
    """Clear a previous synth output (never a folder synth did not make) and mark the run as incomplete.

    The stamp goes first and comes back last (after every file), so a killed run is never skipped."""
    out, paths = artifact.folder, _paths(artifact.folder)
    if out.exists() and any(out.iterdir()):
        if not (paths["synth_json"].exists() or (out / _MARKER).exists()):
            raise MaskfoldError(f"{out} exists, is not empty and holds no synth.json: "
                                f"refusing to write the demo data there (choose another synth.out)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / _MARKER, "synth is writing this folder; rerun synth if this file stays\n")
    artifact.invalidate()
    paths["eval_answers"].unlink(missing_ok=True)
    for sub in ("train", "eval"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)


def write_known_fixes(path: Path, noise: list[dict]) -> None:
    """Like the competition forum's list: half of the mislabeled people become known, as label fixes.

    configs/demo.yaml points data.label_fixes here, so the demo exercises the fix path on its own ids
    (the real list in configs/label_fixes.csv names ids such as 000020 that the demo also has)."""
    rows = [f"{n['id']},{n['field']},{n['true']},known demo mislabel\n" for n in noise[::2]]
    atomic_write_text(path, "id,field,value,reason\n" + "".join(rows))


def result(artifact: Artifact, stamp: dict, skipped: bool) -> dict:
    """What the synth stage returns: every path, the counts, the dataset key and whether it was skipped."""
    return {**{k: str(v) for k, v in _paths(artifact.folder).items()}, **stamp.get("counts", {}),
            "config_hash": artifact.key, "skipped": skipped}


def generate(cfg: dict) -> dict:
    """Render the demo dataset into synth.out (made ready by prepare_folder); returns what the stamp records.

    Writes every file but the stamp: the caller seals the artifact last."""
    from joblib import delayed
    from pipeline.progress import progress

    section = cfg["synth"]
    people_n, eval_n, size = int(section["people"]), int(section["eval_people"]), tuple(section["image_size"])
    seed, workers = int(section["seed"]), int(section["workers"])
    out = Path(section["out"])
    paths = _paths(out)
    train = sample_people(seed, people_n, "train")
    evals = sample_people(seed, eval_n, "eval")
    noise = choose_label_noise(train, float(section["label_noise"]), seed)
    noise |= choose_mask_swaps(train, float(section["mask_swaps"]), seed, taken=set(noise))

    rows = []
    for person in train:
        gender, age = GENDER_NAMES[person["gender"]], person["age"]
        wrong = noise.get(person["index"])
        if wrong and wrong["field"] == "gender":
            gender = wrong["recorded"]
        elif wrong and wrong["field"] == "age":
            age = wrong["recorded"]
        path = f"{person['id']}_{gender}_{RACE}_{age}"
        rows.append((person["id"], gender, RACE, age, path))
        if wrong:
            wrong["path"] = path

    jobs = [delayed(render_person)(seed, "train", p["index"], p["gender"], p["age"], size, str(paths["train_images"] / row[4]),
                                   noise.get(p["index"], {}).get("field") == "swap_mask")
            for p, row in zip(train, rows)]
    jobs += [delayed(render_person)(seed, "eval", p["index"], p["gender"], p["age"], size, str(paths["eval_images"]))
             for p in evals]
    print(f"[synth] rendering {people_n} train + {eval_n} eval people ({7 * (people_n + eval_n)} images, "
          f"{size[0]}x{size[1]}) into {out} with {workers} worker(s)")
    results = parallel(workers, return_as="generator")(jobs)
    records = list(progress(results, total=len(jobs), desc="synth", unit="person"))
    train_records, eval_records = records[:people_n], records[people_n:]

    atomic_write_text(paths["train_csv"], "id,gender,race,age,path\n"
                      + "".join(f"{i},{g},{r},{a},{p}\n" for i, g, r, a, p in rows))

    answers = []
    for person, images in zip(evals, eval_records):
        band = age_band(person["age"], OFFICIAL_OLD)
        for image in images:
            answers.append((image["name"], class_index(image["mask"], person["gender"], band),
                            image["mask"], person["gender"], band))
    order = np.random.default_rng([seed, _SHUFFLE]).permutation(len(answers))
    answers = [answers[i] for i in order]
    atomic_write_text(paths["eval_info"], "ImageID,ans\n" + "".join(f"{a[0]},0\n" for a in answers))
    atomic_write_text(paths["eval_answers"], "ImageID,ans,mask,gender,age_band\n"
                      + "".join(f"{n},{c},{m},{g},{b}\n" for n, c, m, g, b in answers))

    extensions: dict[str, int] = {}
    for images in train_records:
        for image in images:
            ext = Path(image["name"]).suffix
            extensions[ext] = extensions.get(ext, 0) + 1
    true_bands = age_band(np.array([p["age"] for p in train], dtype=np.int64), OFFICIAL_OLD)
    counts = {
        "train_people": people_n,
        "train_images": 7 * people_n,
        "eval_people": eval_n,
        "eval_images": len(answers),
        "mislabeled_people": len(noise),
        "train_female": sum(p["gender"] for p in train),
        "train_age_bands": [int((true_bands == k).sum()) for k in range(3)],
        "train_ids_with_suffix": sum(r[0].endswith("-1") for r in rows),
        "train_extensions": dict(sorted(extensions.items())),
    }
    write_known_fixes(paths["label_fixes"], [noise[i] for i in sorted(noise)])
    print(f"[synth] wrote {counts['train_images']} train images, {counts['eval_images']} eval images, "
          f"{len(noise)} mislabeled people -> {out}")
    return {"version": SYNTH_VERSION, "synth": section, "seed": seed, "counts": counts,
            "official_old_age": OFFICIAL_OLD, "label_noise": [noise[i] for i in sorted(noise)]}


def finish(artifact: Artifact, summary: dict) -> dict:
    """Seal the dataset (stamp last), then drop the in-progress marker."""
    stamp = artifact.seal(**summary)
    (artifact.folder / _MARKER).unlink(missing_ok=True)
    return stamp
