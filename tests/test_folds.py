import numpy as np
import pandas as pd
import pytest

from pipeline import labels
from pipeline.data.folds import assign_folds, folds_path, load_folds, person_table
from pipeline.data.layout import load_train
from pipeline.errors import StaleArtifactError
from pipeline.stages import folds
from tests.conftest import REAL_META, make_config


def image_table_from_people(people: pd.DataFrame) -> pd.DataFrame:
    """7 image rows per person, as load_train would make them (no images needed)."""
    rows = [{"person_id": p.person_id, "gender": p.gender, "age": p.age, "image_id": f"{p.person_id}/{stem}"}
            for p in people.itertuples() for stem in labels.IMAGE_STEMS]
    return pd.DataFrame(rows)


def real_like_table() -> pd.DataFrame:
    if (REAL_META / "train.csv").exists():
        from pipeline.data.layout import read_people

        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "train").mkdir()
            (Path(tmp) / "train" / "train.csv").symlink_to(REAL_META / "train.csv")
            people, _, _ = read_people(tmp)
    else:  # same marginals, drawn
        rng = np.random.default_rng(0)
        people = pd.DataFrame({"person_id": [f"{i:06d}" for i in range(2700)], "gender": rng.random(2700) < 0.61,
                               "age": rng.choice([20, 45, 60], 2700, p=[0.474, 0.455, 0.071])}).astype({"gender": int})
    return image_table_from_people(people)


def test_folds_never_split_a_person():
    table = real_like_table()
    assignment = assign_folds(table, k=5, seed=42, old_age=60)
    assert assignment["person_id"].is_unique
    assert set(assignment["person_id"]) == set(table["person_id"])
    assert sorted(assignment["fold"].unique()) == [0, 1, 2, 3, 4]


def test_every_fold_keeps_each_stratum_share_within_two_points():
    table = real_like_table()
    assignment = assign_folds(table, k=5, seed=42, old_age=60)
    people = person_table(table, 60).merge(assignment, on="person_id")
    overall = people["stratum"].value_counts(normalize=True)
    for fold, members in people.groupby("fold"):
        share = members["stratum"].value_counts(normalize=True).reindex(overall.index, fill_value=0)
        worst = (share - overall).abs().max()
        assert worst <= 0.02, f"fold {fold}: a stratum is {worst:.3f} off the whole"


def test_folds_file_is_reproduced_byte_for_byte(tmp_path, tiny_data):
    cfg = make_config(tmp_path, tiny_data, "folds.k=3")
    path = folds_path(cfg)
    folds.run(cfg)
    first = path.read_bytes()
    folds.run(cfg, force=True)
    assert path.read_bytes() == first
    table, _ = load_train(cfg)
    assert list(pd.read_csv(path, dtype=str).columns) == ["person_id", "fold"]
    assert (load_folds(cfg, table).groupby(table["person_id"]).nunique() == 1).all()


def test_a_folds_file_for_other_data_is_an_error_not_reused(tmp_path, data_copy):
    cfg = make_config(tmp_path, data_copy, "folds.k=3")
    folds.run(cfg)
    path = folds_path(cfg)
    before = path.read_bytes()
    frame = pd.read_csv(data_copy / "train" / "train.csv", dtype=str)
    frame.loc[0, "age"] = "59" if frame.loc[0, "age"] != "59" else "58"
    frame.to_csv(data_copy / "train" / "train.csv", index=False)
    with pytest.raises(StaleArtifactError, match="stale, made from other inputs"):
        folds.run(cfg)
    table, _ = load_train(cfg)
    with pytest.raises(StaleArtifactError, match="stale, made from other inputs"):
        load_folds(cfg, table)
    assert path.read_bytes() == before  # never silently overwritten


def test_different_seeds_give_different_folds():
    table = real_like_table()
    a = assign_folds(table, 5, 1, 60)
    b = assign_folds(table, 5, 2, 60)
    assert (a["fold"] != b["fold"]).any()
