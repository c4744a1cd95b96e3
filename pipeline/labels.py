"""The only place that knows the class layout: the 18-class math, the heads and the age bands.

class = mask * 6 + gender * 3 + age_band
  mask:   worn 0 (mask1..mask5), incorrect 1 (incorrect_mask), not worn 2 (normal)
  gender: male 0, female 1
  age:    <30 -> 0, 30..old-1 -> 1, >=old -> 2

A multihead model emits the heads' logits side by side (mask 3, gender 2, age 3); a single-head
model emits 18. Every probability table holds each head and the joint (TABLE_KEYS). The functions
below work on numpy arrays and torch tensors alike (only methods both share), so this module needs
no torch import.
"""
from __future__ import annotations

import numpy as np

NUM_MASK, NUM_GENDER, NUM_AGE = 3, 2, 3
NUM_CLASSES = NUM_MASK * NUM_GENDER * NUM_AGE  # 18
HEADS = {"mask": NUM_MASK, "gender": NUM_GENDER, "age": NUM_AGE}  # name -> size, in logit order
TABLE_KEYS = (*HEADS, "joint")  # what every probability table holds
SIZES = {**HEADS, "joint": NUM_CLASSES}  # classes per table key (and per training target)
HEAD_KINDS = ("multihead", "single")

MASK_BY_STEM = {
    "mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0,
    "incorrect_mask": 1,
    "normal": 2,
}
IMAGE_STEMS = tuple(MASK_BY_STEM)  # the 7 images every person has
GENDER_BY_NAME = {"male": 0, "female": 1}
GENDER_NAMES = {v: k for k, v in GENDER_BY_NAME.items()}
MASK_NAMES = ("worn", "incorrect", "not_worn")
AGE_NAMES = ("<30", "30-old", ">=old")
YOUNG_BELOW = 30
OFFICIAL_OLD = 60


def mask_of(stem: str) -> int:
    if stem not in MASK_BY_STEM:
        raise ValueError(f"image name {stem!r} is not one of {', '.join(IMAGE_STEMS)}")
    return MASK_BY_STEM[stem]


def gender_of(name: str) -> int:
    key = str(name).strip().lower()
    if key not in GENDER_BY_NAME:
        raise ValueError(f"gender {name!r} is not 'male' or 'female'")
    return GENDER_BY_NAME[key]


def age_band(age, old: int = OFFICIAL_OLD):
    """Age band for a scalar or an array of ages; `old` is the first age of the top band."""
    if not YOUNG_BELOW < old:
        raise ValueError(f"old age cut {old} must be above {YOUNG_BELOW}")
    ages = np.asarray(age)
    bands = np.where(ages < YOUNG_BELOW, 0, np.where(ages < old, 1, 2))
    return int(bands) if bands.ndim == 0 else bands.astype(np.int64)


def class_index(mask, gender, age):
    c = np.asarray(mask) * 6 + np.asarray(gender) * 3 + np.asarray(age)
    return int(c) if c.ndim == 0 else c.astype(np.int64)


def decompose(class_idx):
    """Inverse of class_index: (mask, gender, age band)."""
    c = np.asarray(class_idx)
    if np.any((c < 0) | (c >= NUM_CLASSES)):
        raise ValueError(f"class index outside 0..{NUM_CLASSES - 1}: {c}")
    mask, rest = np.divmod(c, 6)
    gender, age = np.divmod(rest, 3)
    if c.ndim == 0:
        return int(mask), int(gender), int(age)
    return mask, gender, age


def joint_from_heads(p_mask, p_gender, p_age):
    """18-class probabilities as the product of the three heads, in class order."""
    joint = p_mask[:, :, None, None] * p_gender[:, None, :, None] * p_age[:, None, None, :]
    return joint.reshape(-1, NUM_CLASSES)  # -1, not len(): an exported graph keeps its batch axis dynamic


def heads_from_joint(joint) -> dict:
    """Marginal per-head probabilities of an 18-class table."""
    cube = joint.reshape(-1, NUM_MASK, NUM_GENDER, NUM_AGE)
    return {"mask": cube.sum((2, 3)), "gender": cube.sum((1, 3)), "age": cube.sum((1, 2))}


def model_heads(tasks: dict, backbone: str) -> tuple[str, ...]:
    """The heads a backbone predicts: model.tasks[backbone] (a per-task model, e.g. age alone), else all, in
    logit order."""
    chosen = tasks.get(backbone)
    return tuple(HEADS) if not chosen else tuple(h for h in HEADS if h in chosen)


def table_keys(heads=tuple(HEADS)) -> tuple[str, ...]:
    """What a model's probability tables hold: its heads, and the joint when it predicts every head."""
    heads = tuple(heads)
    return TABLE_KEYS if heads == tuple(HEADS) else heads


def num_outputs(head_kind: str, heads=tuple(HEADS)) -> int:
    """Logits a model emits: its heads side by side, or the 18 classes."""
    return sum(HEADS[h] for h in heads) if head_kind == "multihead" else NUM_CLASSES


def trained_heads(head_kind: str, heads=tuple(HEADS)) -> tuple[str, ...]:
    """The targets a model of this kind is trained on: each of its heads, or the joint class."""
    return tuple(heads) if head_kind == "multihead" else ("joint",)


def split_logits(logits, head_kind: str, heads=tuple(HEADS)) -> dict:
    """Logits per trained head (see trained_heads)."""
    if head_kind != "multihead":
        return {"joint": logits}
    parts, start = {}, 0
    for name in heads:
        parts[name] = logits[:, start:start + HEADS[name]]
        start += HEADS[name]
    return parts


def probabilities(logits, head_kind: str, heads=tuple(HEADS)) -> dict:
    """Softmax per head and the 18-class joint from a torch logits batch (table_keys(heads)).

    A multihead model's joint is the product of its heads (a per-task model has no joint); a single-head
    model's heads are the marginals of its joint.
    """
    logits = logits.float()
    if head_kind == "multihead":
        probs = {name: part.softmax(1) for name, part in split_logits(logits, head_kind, heads).items()}
        if tuple(heads) == tuple(HEADS):
            probs["joint"] = joint_from_heads(probs["mask"], probs["gender"], probs["age"])
        return probs
    joint = logits.softmax(1)
    return {**heads_from_joint(joint), "joint": joint}


def targets(mask, gender, band) -> dict[str, np.ndarray]:
    """Integer targets of every head and the joint class, per image."""
    return {"mask": np.asarray(mask), "gender": np.asarray(gender), "age": np.asarray(band),
            "joint": class_index(mask, gender, band)}
