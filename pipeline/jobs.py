"""Where each (backbone, fold) job lives and what identifies it. No torch here: oof and ensemble,
which read only probability tables, import this and start in a second."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from pipeline.config import output_dir, section_hash
from pipeline.io import atomic_save_npz


class MissingCheckpointError(FileNotFoundError):
    pass


def job_list(cfg: dict) -> list[tuple[str, int]]:
    folds = cfg["train"]["folds"]
    folds = list(range(cfg["folds"]["k"])) if folds is None else list(folds)
    bad = [f for f in folds if not 0 <= int(f) < cfg["folds"]["k"]]
    if bad:
        raise ValueError(f"train.folds {bad} outside 0..{cfg['folds']['k'] - 1}")
    return [(backbone, int(fold)) for backbone in cfg["model"]["backbones"] for fold in folds]


def job_dir(cfg: dict, backbone: str, fold: int) -> Path:
    return output_dir(cfg, "train", backbone.replace("/", "_"), f"fold{fold}")


def infer_dir(cfg: dict, backbone: str, fold: int) -> Path:
    return output_dir(cfg, "infer", backbone.replace("/", "_"), f"fold{fold}")


def job_config(cfg: dict, backbone: str) -> dict:
    """The config as this one job sees it: one backbone; fold list and worker counts don't matter."""
    job = copy.deepcopy(cfg)
    job["model"]["backbones"] = [backbone]
    job["train"]["folds"] = None
    # where things live and how many workers run do not change results; the data fingerprint
    # (image ids, people, labels after fixes) stands for the data itself
    for key in ("root", "cache_dir", "label_fixes", "num_workers"):
        job["data"][key] = None
    job["train"]["threads"] = None
    return job


def job_hash(cfg: dict, backbone: str, fingerprint: str) -> str:
    job = job_config(cfg, backbone)
    job["data_fingerprint"] = fingerprint
    return section_hash(job, "data", "folds", "model", "train", "augment", "data_fingerprint")


def save_probs(path, table, probs: dict, **meta) -> None:
    """The currency between stages: one row per image id, float32 per head and joint, with labels."""
    atomic_save_npz(path, image_id=table["image_id"].to_numpy().astype(str),
                    label=table["label"].to_numpy().astype(np.int64),
                    **{f"probs_{k}": v.astype(np.float32) for k, v in probs.items()},
                    **{k: np.asarray(v) for k, v in meta.items()})
