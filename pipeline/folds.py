"""folds stage: person-grouped, stratified K folds shared by every backbone and every later run.

StratifiedGroupKFold over image rows, grouped by person, stratified on the person's
gender x age band; written to folds/<dataset>-k<K>-seed<S>.csv (person_id, fold) with a sidecar
.json holding the data fingerprint. Same inputs -> the same file, byte for byte.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pipeline import labels
from pipeline.config import stage_main
from pipeline.data import load_train
from pipeline.io import atomic_write_json, atomic_write_text, git_commit, stable_hash


class FoldsError(RuntimeError):
    pass


def person_table(table: pd.DataFrame, old_age: int) -> pd.DataFrame:
    people = table.groupby("person_id", sort=True).agg(
        gender=("gender", "first"), age=("age", "first")).reset_index()
    people["stratum"] = people["gender"] * 3 + labels.age_band(people["age"].to_numpy(), old_age)
    return people


def people_fingerprint(people: pd.DataFrame) -> str:
    return stable_hash(people[["person_id", "gender", "age"]].to_numpy().tolist(), length=16)


def folds_path(cfg: dict) -> Path:
    dataset = Path(cfg["data"]["root"]).resolve().name
    return Path(cfg["folds"]["dir"]) / f"{dataset}-k{cfg['folds']['k']}-seed{cfg['folds']['seed']}.csv"


def assign_folds(table: pd.DataFrame, k: int, seed: int, old_age: int) -> pd.DataFrame:
    """(person_id, fold) for every person, sorted by person_id (the image folder name, which starts with the id)."""
    people = person_table(table, old_age)
    if len(people) < k:
        raise FoldsError(f"{len(people)} people cannot fill {k} folds")
    stratum_of = dict(zip(people["person_id"], people["stratum"]))
    strata = table["person_id"].map(stratum_of).to_numpy()
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold_of: dict[str, int] = {}
    for fold, (_, val_index) in enumerate(splitter.split(np.zeros(len(table)), strata, groups=table["person_id"])):
        for pid in table["person_id"].iloc[val_index].unique():
            fold_of[pid] = fold
    return pd.DataFrame({"person_id": people["person_id"], "fold": people["person_id"].map(fold_of).astype(int)})


def load_folds(cfg: dict, table: pd.DataFrame) -> pd.Series:
    """Fold of every image row; the folds file must exist and match the data."""
    path = folds_path(cfg)
    if not path.exists():
        raise FoldsError(f"{path} not found: run the folds stage first (python -m pipeline.folds -c CONFIG)")
    _check_fingerprint(path, person_table(table, cfg["data"]["old_age"]))
    folds = pd.read_csv(path, dtype={"person_id": str, "fold": int})
    fold_of = dict(zip(folds["person_id"], folds["fold"]))
    missing = sorted(set(table["person_id"]) - set(fold_of))
    if missing:
        raise FoldsError(f"{path}: no fold for {len(missing)} people, e.g. {missing[:3]}")
    return table["person_id"].map(fold_of).astype(int)


def _check_fingerprint(path: Path, people: pd.DataFrame) -> None:
    meta_path = path.with_suffix(".json")
    expected = people_fingerprint(people)
    if not meta_path.exists():
        raise FoldsError(f"{path}: its fingerprint file {meta_path} is missing; cannot tell which data it was made for")
    recorded = json.loads(meta_path.read_text()).get("fingerprint")
    if recorded != expected:
        raise FoldsError(f"{path} was made for different data (fingerprint {recorded}, data now {expected}); "
                         f"delete it or rerun the folds stage with --force to replace it")


def run(cfg: dict, force: bool = False) -> dict:
    table, _ = load_train(cfg)
    k, seed, old = cfg["folds"]["k"], cfg["folds"]["seed"], cfg["data"]["old_age"]
    path = folds_path(cfg)
    people = person_table(table, old)
    if path.exists() and not force:
        _check_fingerprint(path, people)
        print(f"folds: {path} exists and matches the data; reusing it")
        return {"path": str(path)}
    folds = assign_folds(table, k, seed, old)
    atomic_write_text(path, folds.to_csv(index=False, lineterminator="\n"))
    people = people.merge(folds, on="person_id")
    per_fold = {int(f): {"people": int((people["fold"] == f).sum()),
                         "strata": people.loc[people["fold"] == f, "stratum"].value_counts().sort_index().to_dict()}
                for f in range(k)}
    atomic_write_json(path.with_suffix(".json"), {
        "fingerprint": people_fingerprint(people), "k": k, "seed": seed, "old_age": old,
        "data_root": cfg["data"]["root"], "git_commit": git_commit(), "per_fold": per_fold})
    print(f"folds: wrote {path}")
    for fold, info in per_fold.items():
        print(f"  fold {fold}: {info['people']} people")
    return {"path": str(path)}


if __name__ == "__main__":
    stage_main(run, "Assign person-grouped, stratified folds")
