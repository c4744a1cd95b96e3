"""Everything the (backbone, fold) jobs of one run share: image rows, folds, decoded pixels, targets (and, for
inference, the eval images)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline import labels
from pipeline.data.folds import load_folds
from pipeline.data.images import cached_images
from pipeline.data.layout import data_fingerprint, load_eval, load_train
from pipeline.data.pixels import ImageSet, image_set


@dataclass
class TrainData:
    table: pd.DataFrame
    fold: np.ndarray          # fold of every image row
    images: np.ndarray        # (N, H, W, 3) uint8, row-aligned with table; may be a memory map
    train_targets: dict       # per head and joint, with the training age cut (data.train_old_age)
    fingerprint: dict         # labels, pixels and (detect mode) boxes: see train_fingerprint
    _stores: dict = field(default_factory=dict, repr=False)

    def store(self, device):
        """The images where batches are cut from on `device`, made once per process (see resident)."""
        if str(device) not in self._stores:
            self._stores[str(device)] = resident(self.images, device)
        return self._stores[str(device)]

    def split(self, fold: int) -> tuple[np.ndarray, np.ndarray]:
        """(training rows, validation rows) of one job: the validation fold's people never train it."""
        train_rows, val_rows = np.flatnonzero(self.fold != fold), np.flatnonzero(self.fold == fold)
        if len(train_rows) == 0 or len(val_rows) == 0:
            raise ValueError(f"fold {fold} leaves no training or no validation images")
        return train_rows, val_rows


def fingerprint_of(table: pd.DataFrame, images: ImageSet) -> dict:
    """The identity of the labelled training data: which images of whom with which labels, their bytes and
    (detect mode) the faces they are cropped around. Every training job, and all made from one, records it."""
    return {"labels": data_fingerprint(table), **images.identity}


def train_fingerprint(cfg: dict, table: pd.DataFrame) -> dict:
    """fingerprint_of the training table as it is on disk now (reads every image's bytes: seconds)."""
    return fingerprint_of(table, image_set(cfg, "train", table["file"]))


def load_train_data(cfg: dict) -> TrainData:
    table, _ = load_train(cfg)
    fold = load_folds(cfg, table).to_numpy()
    images = image_set(cfg, "train", table["file"])
    pixels = cached_images(cfg, images, desc="decode train")
    band = labels.age_band(table["age"].to_numpy(), cfg["data"]["train_old_age"])
    targets = labels.targets(table["mask"].to_numpy(), table["gender"].to_numpy(), band)
    return TrainData(table, fold, pixels, targets, fingerprint_of(table, images))


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
