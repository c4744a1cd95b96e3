"""Person-grouped, stratified K folds, shared by every backbone and every later run.

StratifiedGroupKFold over image rows, grouped by person, stratified on the person's
gender x age band; written to folds/<dataset>-k<K>-seed<S>.csv (person_id, fold) with a stamp
beside it (<same name>.json) holding the people fingerprint and the file's digest. Same inputs -> the
same file, byte for byte. A file made for other data, or changed after it was made, is refused, never
reused or overwritten; so is one that puts a person in two folds or uses a fold outside 0..K-1.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pipeline import labels
from pipeline.artifacts import Artifact
from pipeline.data.layout import quoted, read_csv
from pipeline.errors import ArtifactError, DataError, MaskfoldError
from pipeline.io import atomic_write_text, stable_hash


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


def folds_artifact(cfg: dict, table: pd.DataFrame) -> Artifact:
    path = folds_path(cfg)
    people = person_table(table, cfg["data"]["old_age"])
    return Artifact(what=f"folds file {path}", folder=path.parent, stamp_name=path.with_suffix(".json").name,
                    identity={"people": people_fingerprint(people), "k": cfg["folds"]["k"],
                              "seed": cfg["folds"]["seed"], "old_age": cfg["data"]["old_age"]},
                    remedy=REMEDY, outputs=(path.name,), shared_folder=True,
                    check_outputs="digest")  # a few KB, and a hand edit keeps its size when it moves a person


REMEDY = "./run.sh folds -c CONFIG --force (replaces the file every run of this data shares)"


def assign_folds(table: pd.DataFrame, k: int, seed: int, old_age: int) -> pd.DataFrame:
    """(person_id, fold) for every person, sorted by person_id (the image folder name, which starts with the id)."""
    people = person_table(table, old_age)
    if len(people) < k:
        raise DataError([f"{len(people)} people cannot fill {k} folds (folds.k)"])
    stratum_of = dict(zip(people["person_id"], people["stratum"]))
    strata = table["person_id"].map(stratum_of).to_numpy()
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold_of: dict[str, int] = {}
    for fold, (_, val_index) in enumerate(splitter.split(np.zeros(len(table)), strata, groups=table["person_id"])):
        for pid in table["person_id"].iloc[val_index].unique():
            fold_of[pid] = fold
    return pd.DataFrame({"person_id": people["person_id"], "fold": people["person_id"].map(fold_of).astype(int)})


def folds_csv(cfg: dict, table: pd.DataFrame) -> str:
    """The folds file's text for this data: the same inputs always give the same bytes."""
    folds = assign_folds(table, cfg["folds"]["k"], cfg["folds"]["seed"], cfg["data"]["old_age"])
    return folds.to_csv(index=False, lineterminator="\n")


def write_folds(cfg: dict, table: pd.DataFrame, text: str | None = None) -> dict:
    """Write the folds file (unless `text` is already its content) and its stamp; returns per-fold counts."""
    artifact = folds_artifact(cfg, table)
    k, old = cfg["folds"]["k"], cfg["data"]["old_age"]
    artifact.invalidate()
    if text is None:
        text = folds_csv(cfg, table)
        atomic_write_text(folds_path(cfg), text)
    folds = pd.read_csv(io.StringIO(text), dtype={"person_id": str, "fold": int})
    people = person_table(table, old).merge(folds, on="person_id")
    per_fold = {int(f): {"people": int((people["fold"] == f).sum()),
                         "strata": people.loc[people["fold"] == f, "stratum"].value_counts().sort_index().to_dict()}
                for f in range(k)}
    artifact.seal(per_fold=per_fold, data_root=cfg["data"]["root"])
    return per_fold


def read_folds(cfg: dict) -> pd.DataFrame:
    """The folds file's rows (person_id, fold as int); every person in one fold, every fold in 0..K-1, else an
    error naming the file, the rows and the people, with the command that remakes it."""
    path, k = folds_path(cfg), cfg["folds"]["k"]
    try:
        folds = read_csv(path, ("person_id", "fold"), what="one row per person")
        problems, first_row = [], {}
        for row, (person, fold) in enumerate(zip(folds["person_id"], folds["fold"]), start=1):
            where = f"{path} row {row} (line {row + 1}, person {quoted(person)})"
            if not fold.isdigit() or not fold.isascii():
                problems.append(f"{where}: fold {quoted(fold)} is not a fold number")
            elif int(fold) >= k:
                problems.append(f"{where}: fold {int(fold)} is outside 0..{k - 1} (folds.k is {k})")
            earlier = first_row.setdefault(person, row)
            if earlier != row:
                problems.append(f"{path} rows {earlier} and {row} (lines {earlier + 1} and {row + 1}): person "
                                f"{quoted(person)} is listed twice (folds {quoted(folds['fold'][earlier - 1])} and "
                                f"{quoted(fold)}); every person must be in exactly one fold")
        if problems:
            raise DataError(problems[:5] + ([f"and {len(problems) - 5} more"] if len(problems) > 5 else []))
    except DataError as error:  # stamped, then damaged (a disk error, an edit by hand)
        raise ArtifactError(f"{'; '.join(error.problems)}; re-run: {REMEDY}") from error
    return folds.assign(fold=folds["fold"].astype(int))


def load_folds(cfg: dict, table: pd.DataFrame) -> pd.Series:
    """Fold of every image row; the folds file must be sound, made for this data and unchanged since."""
    path = folds_path(cfg)
    folds = read_folds(cfg) if path.exists() else None  # its rows first: a bad row is named, not just the file
    folds_artifact(cfg, table).require()
    fold_of = dict(zip(folds["person_id"], folds["fold"]))
    missing = sorted(set(table["person_id"]) - set(fold_of))
    if missing:
        raise MaskfoldError(f"{path}: no fold for {len(missing)} people, e.g. {missing[:3]}; re-run: {REMEDY}")
    return table["person_id"].map(fold_of).astype(int)
