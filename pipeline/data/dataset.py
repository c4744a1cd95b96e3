"""Everything the (backbone, fold) jobs of one run share: image rows, folds, decoded pixels, targets."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline import labels
from pipeline.data.folds import load_folds
from pipeline.data.images import cached_images
from pipeline.data.layout import data_fingerprint, load_train


@dataclass
class TrainData:
    table: pd.DataFrame
    fold: np.ndarray          # fold of every image row
    images: np.ndarray        # (N, H, W, 3) uint8, row-aligned with table; may be a memory map
    train_targets: dict       # per head and joint, with the training age cut (data.train_old_age)
    fingerprint: str

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
