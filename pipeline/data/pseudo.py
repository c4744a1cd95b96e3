"""What a run learns from another run's ensemble: pseudo-labels for the eval images, and soft targets for a student.

Both come from a teacher run's <output.dir>/ensemble_probs.npz (the ensemble stage writes it: the ensemble's
probabilities for every eval image, and its pooled out-of-fold ones for every training image).

pseudo.labels    a pseudo.csv the pseudo stage wrote from a teacher: per eval image and head, the ensemble's label
                 where its probability reaches pseudo.thresholds[head] (the first-place team's gender 0.9, age 0.8,
                 mask 0.95 by default), else -1. Those images join every fold's training set with those labels,
                 and no validation fold: eval people are in none, so OOF scores stay honest. A head at -1 adds
                 no loss for that image.
distill.teacher  an ensemble_probs.npz: the soft targets of a student: each training image's OOF probabilities,
                 each eval image's ensemble probabilities (every eval image joins training). Validation still
                 scores the recorded labels.

Their bytes join the training jobs' data fingerprint (dataset.fingerprint_of), so another table makes every job
trained from the old one stale. No torch here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import labels
from pipeline.data.layout import read_csv
from pipeline.errors import DataError
from pipeline.io import load_npz

ENSEMBLE_PROBS = "ensemble_probs.npz"  # in the teacher's output.dir
PSEUDO_COLUMNS = ("ImageID", "mask", "gender", "age", "class", "mask_p", "gender_p", "age_p")
UNLABELLED = -1  # a head below its threshold


def teacher_tables(path) -> dict[str, dict]:
    """{"eval": {...}, "oof": {...}} of an ensemble_probs.npz, each with image_id and probs per labels.TABLE_KEYS."""
    arrays = load_npz(path)
    tables = {}
    for part in ("eval", "oof"):
        missing = [k for k in ("image_id", *labels.TABLE_KEYS) if f"{part}_{k}" not in arrays]
        if missing:
            raise DataError([f"{path}: not an ensemble_probs.npz (no {part}_{missing[0]}); "
                             f"it is written by ./run.sh ensemble -c CONFIG"])
        tables[part] = {k: arrays[f"{part}_{k}"] for k in ("image_id", *labels.TABLE_KEYS)}
    return tables


def choose(probs: dict[str, np.ndarray], image_ids, thresholds: dict[str, float]) -> pd.DataFrame:
    """The pseudo table: per eval image, each head's argmax where its probability reaches the head's
    threshold (else UNLABELLED), the ensemble's 18-class argmax (`class`: what weighted sampling and
    same-label CutMix group it by) and each head's top probability."""
    frame = {"ImageID": np.asarray(image_ids).astype(str)}
    for head in labels.HEADS:
        top, arg = probs[head].max(1), probs[head].argmax(1)
        frame[head] = np.where(top >= thresholds[head], arg, UNLABELLED).astype(np.int64)
        frame[f"{head}_p"] = np.round(top.astype(np.float64), 6)
    frame["class"] = probs["joint"].argmax(1).astype(np.int64)
    return pd.DataFrame(frame)[list(PSEUDO_COLUMNS)]


def read_pseudo(path, eval_ids) -> pd.DataFrame:
    """A pseudo.csv, checked: every ImageID an eval image of this data, once; labels in range or -1.
    Problems name the file and row."""
    frame = read_csv(path, PSEUDO_COLUMNS)
    known = set(map(str, eval_ids))
    sizes = {**labels.HEADS, "class": labels.NUM_CLASSES}
    problems, seen = [], {}
    for row, record in enumerate(frame.to_dict("records"), start=2):  # row 1 is the header
        where, image_id = f"{path} row {row}", record["ImageID"]
        if image_id not in known:
            problems.append(f"{where}: ImageID {image_id!r} is not an eval image of this data (eval/info.csv)")
        if image_id in seen:
            problems.append(f"{where}: ImageID {image_id!r} repeats row {seen[image_id]}")
        seen[image_id] = row
        for column, size in sizes.items():
            value = record[column]
            low = 0 if column == "class" else UNLABELLED
            if not (str(value).lstrip("-").isdigit() and low <= int(value) < size):
                problems.append(f"{where}: {column} {value!r} is not an integer in {low}..{size - 1}")
    if problems:
        raise DataError(problems)
    frame = frame.astype({c: np.int64 for c in sizes})
    return frame[(frame[list(labels.HEADS)] != UNLABELLED).any(axis=1)].reset_index(drop=True)


def pseudo_targets(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Integer targets of the pseudo rows: each head (-1 where unlabelled), the joint where every head is
    labelled (else -1), and `group` (the ensemble's class) for sampling and CutMix."""
    heads = {h: frame[h].to_numpy(np.int64) for h in labels.HEADS}
    complete = np.all([v >= 0 for v in heads.values()], axis=0)
    joint = np.where(complete, labels.class_index(*(np.maximum(v, 0) for v in heads.values())), UNLABELLED)
    return {**heads, "joint": joint.astype(np.int64), "group": frame["class"].to_numpy(np.int64)}


def soft_targets(path, train_ids, eval_ids) -> tuple[dict, dict]:
    """({key: (N_train, C)}, {key: (N_eval, C)}) teacher probabilities in the given image orders; a training
    or eval image the teacher did not predict is an error naming the file."""
    tables = teacher_tables(path)
    out = []
    for part, ids in (("oof", train_ids), ("eval", eval_ids)):
        table = tables[part]
        position = {image_id: i for i, image_id in enumerate(table["image_id"].astype(str))}
        missing = [i for i in map(str, ids) if i not in position]
        if missing:
            raise DataError([f"{path}: the teacher has no {part} probabilities for {len(missing)} images of this "
                             f"data (first: {missing[0]}); was it made from this data?"])
        rows = np.array([position[i] for i in map(str, ids)], dtype=np.int64)
        out.append({key: table[key][rows].astype(np.float32) for key in labels.TABLE_KEYS})
    return out[0], out[1]


def resolve(cfg: dict, key: str) -> Path | None:
    """The file a pseudo.labels / distill.teacher key names, or None; a missing file is an error naming the key."""
    section, name = key.split(".")
    value = cfg[section][name]
    if not value:
        return None
    path = Path(value)
    if not path.is_file():
        raise DataError([f"{key}: {path} not found (the pseudo stage writes pseudo.csv, the ensemble stage "
                         f"{ENSEMBLE_PROBS}, under the teacher run's output.dir)"])
    return path
