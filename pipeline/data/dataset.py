"""Everything the (backbone, fold) jobs of one run share: image rows, folds, decoded pixels, targets (and, for
inference, the eval images)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline import labels
from pipeline.artifacts import file_digest
from pipeline.data import pseudo
from pipeline.data.folds import load_folds
from pipeline.data.images import cached_images
from pipeline.data.layout import data_fingerprint, load_eval, load_train
from pipeline.data.pixels import ImageSet, image_set
from pipeline.errors import DataError


@dataclass
class TrainData:
    table: pd.DataFrame
    fold: np.ndarray          # fold of every image row
    images: np.ndarray        # (N, H, W, 3) uint8, row-aligned with table; may be a memory map
    train_targets: dict       # per head, joint and group (what sampling and CutMix group by), with the training
                              # age cut (data.train_old_age); -1 where a pseudo-labelled image's head is unknown
    fingerprint: dict         # labels, pixels, (detect mode) boxes, pseudo-labels, teacher: see fingerprint_of
    soft_targets: dict | None = None  # distill.teacher's probabilities per head and joint, row-aligned
    _stores: dict = field(default_factory=dict, repr=False)

    def store(self, device):
        """The images where batches are cut from on `device`, made once per process (see resident)."""
        if str(device) not in self._stores:
            self._stores[str(device)] = resident(self.images, device)
        return self._stores[str(device)]

    def split(self, fold: int) -> tuple[np.ndarray, np.ndarray]:
        """(training rows, validation rows) of one job: the validation fold's people never train it; the
        eval images pseudo-labels or a teacher add (fold -1) train every job."""
        train_rows, val_rows = np.flatnonzero(self.fold != fold), np.flatnonzero(self.fold == fold)
        if len(train_rows) == 0 or len(val_rows) == 0:
            raise ValueError(f"fold {fold} leaves no training or no validation images")
        return train_rows, val_rows


def fingerprint_of(cfg: dict, table: pd.DataFrame, images: ImageSet) -> dict:
    """The identity of the labelled training data: which images of whom with which labels, their bytes,
    (detect mode) the faces they are cropped around, and the bytes of a pseudo-label table or a teacher's
    probabilities it trains with (not their paths). Every training job, and all made from one, records it."""
    extra = {}
    for key, name in (("pseudo.labels", "pseudo"), ("distill.teacher", "teacher")):
        path = pseudo.resolve(cfg, key)
        if path is not None:
            extra[name] = file_digest(path)
    return {"labels": data_fingerprint(table), **images.identity, **extra}


def train_fingerprint(cfg: dict, table: pd.DataFrame) -> dict:
    """fingerprint_of the training table as it is on disk now (reads every image's bytes: seconds)."""
    return fingerprint_of(cfg, table, image_set(cfg, "train", table["file"]))


def load_train_data(cfg: dict) -> TrainData:
    table, _ = load_train(cfg)
    fold = load_folds(cfg, table).to_numpy()
    images = image_set(cfg, "train", table["file"])
    pixels = cached_images(cfg, images, desc="decode train")
    band = labels.age_band(table["age"].to_numpy(), cfg["data"]["train_old_age"])
    targets = labels.targets(table["mask"].to_numpy(), table["gender"].to_numpy(), band)
    targets["group"] = targets["joint"]
    data = TrainData(table, fold, pixels, targets, fingerprint_of(cfg, table, images))
    return _with_eval_images(cfg, data)


def _with_eval_images(cfg: dict, data: TrainData) -> TrainData:
    """The training data plus the eval images that pseudo.labels or distill.teacher give targets to: appended
    rows in fold -1, which every job trains on and none validates on (eval people are in no fold)."""
    labelled, teacher = pseudo.resolve(cfg, "pseudo.labels"), pseudo.resolve(cfg, "distill.teacher")
    if labelled is None and teacher is None:
        return data
    if labelled is not None and teacher is not None:
        raise DataError(["pseudo.labels and distill.teacher are both set: a student learns the teacher's "
                         "probabilities of every eval image already; set one of them to null"])
    eval_table, _ = load_eval(cfg)
    eval_ids = eval_table["ImageID"].to_numpy().astype(str)
    soft = None
    if teacher is not None:  # every eval image, with the teacher's probabilities
        train_soft, eval_soft = pseudo.soft_targets(teacher, data.table["image_id"], eval_ids)
        rows = np.arange(len(eval_table))
        soft = {k: np.concatenate([train_soft[k], eval_soft[k]]) for k in labels.TABLE_KEYS}
        unknown = np.full(len(rows), pseudo.UNLABELLED)
        added = {**{h: unknown for h in (*labels.HEADS, "joint")}, "group": eval_soft["joint"].argmax(1)}
    else:
        chosen = pseudo.read_pseudo(labelled, eval_ids)
        rows = pd.Index(eval_ids).get_indexer(chosen["ImageID"])
        added = pseudo.pseudo_targets(chosen)
    images = image_set(cfg, "eval", eval_table["file"])
    eval_pixels = cached_images(cfg, images, desc="decode eval")[rows]
    extra = pd.DataFrame({"person_id": [f"eval:{i}" for i in eval_ids[rows]], "image_id": [f"eval/{i}" for i in eval_ids[rows]],
                          "file": eval_table["file"].to_numpy()[rows], "label": added["joint"]})
    table = pd.concat([data.table, extra], ignore_index=True)
    targets = {k: np.concatenate([v, np.asarray(added[k], dtype=np.int64)]) for k, v in data.train_targets.items()}
    fold = np.concatenate([data.fold, np.full(len(rows), -1)])
    # one array in memory (the cache is a memory map): the eval images a run adds are a fraction of the set
    pixels = np.concatenate([np.asarray(data.images), eval_pixels])
    return TrainData(table, fold, pixels, targets, data.fingerprint, soft_targets=soft)


@dataclass
class InferData:
    train: TrainData
    eval_table: pd.DataFrame  # info.csv's rows, in its order
    eval_key: dict            # identity of the eval images (their bytes; the boxes in detect mode)
    eval_images: np.ndarray
    _stores: dict = field(default_factory=dict, repr=False)

    def stores(self, device) -> dict:
        """{"train": ..., "eval": ...} uint8 caches on `device` (see resident), made once per process."""
        if str(device) not in self._stores:
            self._stores[str(device)] = {"train": self.train.store(device), "eval": resident(self.eval_images, device)}
        return self._stores[str(device)]


def load_infer_data(cfg: dict) -> InferData:
    train = load_train_data(cfg)
    eval_table, _ = load_eval(cfg)
    images = image_set(cfg, "eval", eval_table["file"])
    return InferData(train, eval_table, images.identity, cached_images(cfg, images, desc="decode eval"))


def eval_identity(cfg: dict, eval_table: pd.DataFrame) -> dict:
    """InferData.eval_key of the eval images as they are on disk now."""
    return image_set(cfg, "eval", eval_table["file"]).identity


def resident(images: np.ndarray, device):
    """Where batches are cut from: the whole uint8 cache on the GPU when it fits in half the free memory
    (6.3 GB for the full data at 384x288), else the host array (on CPU a memory map, read per batch)."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if images.nbytes < free / 2:
            return torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return images
