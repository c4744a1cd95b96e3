"""Everything the (backbone, fold) jobs of one run share: image rows, folds, decoded pixels, targets (and, for
inference, the eval images)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline import labels
from pipeline.data.folds import load_folds
from pipeline.data.images import cached_images, files_key
from pipeline.data.layout import data_fingerprint, load_eval, load_train


@dataclass
class TrainData:
    table: pd.DataFrame
    fold: np.ndarray          # fold of every image row
    images: np.ndarray        # (N, H, W, 3) uint8, row-aligned with table; may be a memory map
    train_targets: dict       # per head and joint, with the training age cut (data.train_old_age)
    fingerprint: str
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


def load_train_data(cfg: dict) -> TrainData:
    table, _ = load_train(cfg)
    fold = load_folds(cfg, table).to_numpy()
    images = cached_images(cfg, table["file"], desc="decode train")
    band = labels.age_band(table["age"].to_numpy(), cfg["data"]["train_old_age"])
    targets = labels.targets(table["mask"].to_numpy(), table["gender"].to_numpy(), band)
    return TrainData(table, fold, images, targets, data_fingerprint(table))


@dataclass
class InferData:
    train: TrainData
    eval_table: pd.DataFrame  # info.csv's rows, in its order
    eval_key: str             # identity of the eval image files (path, size, mtime)
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
    return InferData(train, eval_table, files_key(eval_table["file"]),
                     cached_images(cfg, eval_table["file"], desc="decode eval"))


def resident(images: np.ndarray, device):
    """Where batches are cut from: the whole uint8 cache on the GPU when it fits in half the free memory
    (6.3 GB for the full data at 384x288), else the host array (on CPU a memory map, read per batch)."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if images.nbytes < free / 2:
            return torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return images
