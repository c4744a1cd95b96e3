"""Probability tables, the currency between train, oof, infer and ensemble.

One .npz per (job, image set): `image_id`, `label` (where known) and one float32 array per entry of
labels.TABLE_KEYS (a per-task model's: its heads, labels.table_keys), stored as `probs_<key>`. Pooling a backbone's K validation tables gives its
out-of-fold table: every image predicted by the one model that never saw it.
"""
from __future__ import annotations

import numpy as np

from pipeline import labels
from pipeline.artifacts import (VAL_PROBS, Artifact, fresh_train_stamps, infer_artifact, output_dir, require_all,
                                train_artifact)
from pipeline.data.pseudo import ENSEMBLE_PROBS
from pipeline.errors import ArtifactError
from pipeline.io import atomic_save_npz, load_npz

ENSEMBLE_REPORT, ENSEMBLE_STAMP = "ensemble.json", "ensemble.done.json"


def save_probs(path, table, probs: dict, **meta) -> None:
    """One row per image of `table` (its image_id, and label when it has one), per head and joint."""
    columns = {"image_id": table["image_id"].to_numpy().astype(str)}
    if "label" in table:
        columns["label"] = table["label"].to_numpy().astype(np.int64)
    atomic_save_npz(path, **columns, **{f"probs_{k}": probs[k].astype(np.float32) for k in labels.TABLE_KEYS
                                        if k in probs},
                    **{k: np.asarray(v) for k, v in meta.items()})


def probs_of(table: dict) -> dict[str, np.ndarray]:
    """The probability arrays of a loaded table, keyed like labels.TABLE_KEYS (a per-task model's: its heads)."""
    return {key: table[f"probs_{key}"] for key in labels.TABLE_KEYS if f"probs_{key}" in table}


def pool_folds(paths: dict[int, object]) -> dict[str, np.ndarray]:
    """Concatenate per-fold tables {fold: path} into one, sorted by image id, with each row's fold."""
    parts = []
    for fold, path in paths.items():
        table = load_npz(path)
        table["fold"] = np.full(len(table["image_id"]), fold)
        parts.append(table)
    keys = ("image_id", "label", "fold", *(f"probs_{k}" for k in labels.TABLE_KEYS if f"probs_{k}" in parts[0]))
    pooled = {key: np.concatenate([p[key] for p in parts]) for key in keys}
    order = np.argsort(pooled["image_id"], kind="stable")
    return {key: value[order] for key, value in pooled.items()}


def check_coverage(pooled: dict, image_ids, what: str) -> None:
    """An OOF table must predict every training image exactly once."""
    ids = pooled["image_id"]
    if len(np.unique(ids)) != len(ids):
        raise ArtifactError(f"{what}: some images are predicted by more than one fold")
    if set(ids) != set(image_ids):
        raise ArtifactError(f"{what}: the out-of-fold table covers {len(ids)} images, the data has {len(image_ids)}")


def mean_of_folds(paths: dict[int, object], image_ids: np.ndarray, what: str) -> dict[str, np.ndarray]:
    """Soft vote of a backbone's fold models on the eval set: the mean of their tables, in `image_ids` order."""
    tables = [load_npz(path) for path in paths.values()]
    for fold, table in zip(paths, tables):
        if not np.array_equal(table["image_id"], image_ids):
            raise ArtifactError(f"{what} fold {fold}: {paths[fold]} does not list info.csv's ImageIDs in order; "
                                f"re-run: ./run.sh infer -c CONFIG --force")
    return {key: np.mean([probs_of(t)[key] for t in tables], axis=0) for key in probs_of(tables[0])}


# ---------------------------------------------------------------- where a backbone's tables come from

def oof_table(cfg: dict, backbone: str, train_table, fingerprint: dict) -> dict[str, np.ndarray]:
    """A backbone's out-of-fold validation table; every fold must be trained from this data and up to date
    (`fingerprint`: pipeline.data.dataset.train_fingerprint)."""
    fresh_train_stamps(cfg, backbone, fingerprint)
    paths = {f: train_artifact(cfg, backbone, f, fingerprint).path(VAL_PROBS) for f in range(cfg["folds"]["k"])}
    pooled = pool_folds(paths)
    check_coverage(pooled, train_table["image_id"], f"backbone {backbone}")
    return pooled


def fresh_infer_artifacts(cfg: dict, backbone: str, fingerprint: dict, eval_key: dict) -> dict[int, Artifact]:
    """A backbone's K inference folders, each made from its fold's current checkpoint with this TTA and eval set.

    Tables predicted from an older checkpoint, another TTA list or other eval images are refused,
    naming the infer stage to re-run.
    """
    stamps = fresh_train_stamps(cfg, backbone, fingerprint)
    artifacts = {f: infer_artifact(cfg, backbone, f, stamps[f]["token"], eval_key) for f in stamps}
    require_all(list(artifacts.values()), f"backbone {backbone}: inference tables not usable")
    return artifacts


def ensemble_artifact(cfg: dict, fingerprint: dict, eval_key: dict) -> Artifact:
    """submission.csv, ensemble_probs.npz and ensemble.json: what the ensemble stage fitted together. Its identity
    is every inference table's stamp (each made from its fold's checkpoint, TTA and eval images) and the ensemble
    section, so after a retrain and a re-infer the old ensemble is stale: export and pseudo refuse it, naming what
    changed, instead of pairing new weights with old backbone weights and decision offsets."""
    tokens = {f"{backbone} fold {fold}": artifact.read_stamp()["token"] for backbone in cfg["model"]["backbones"]
              for fold, artifact in fresh_infer_artifacts(cfg, backbone, fingerprint, eval_key).items()}
    return Artifact(what="ensemble (submission.csv, ensemble.json, ensemble_probs.npz)", folder=output_dir(cfg),
                    identity={"infer": tokens, "ensemble": cfg["ensemble"]}, remedy="./run.sh ensemble -c CONFIG",
                    stamp_name=ENSEMBLE_STAMP, outputs=("submission.csv", ENSEMBLE_PROBS, ENSEMBLE_REPORT),
                    shared_folder=True, check_outputs="size")
