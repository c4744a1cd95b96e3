"""Hostile and damaged files: every one is refused (or, for the pixel cache, rebuilt) with a short message naming it."""
import json
import pickle
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.artifacts import train_artifact
from pipeline.data import images
from pipeline.data.folds import folds_artifact, folds_path, load_folds
from pipeline.data.layout import load_train
from pipeline.errors import ArtifactError, DataError, StaleArtifactError
from pipeline.io import load_npz
from pipeline.stages import check, ensemble, folds, infer, train
from tests.conftest import make_config

HOSTILE_CSVS = {
    "empty": b"",
    "nul-filled": b"\0" * 300_000,
    "nul lines": (b"\0" * 1000 + b"\n") * 300,
    "one 300 KB line": b"x" * 300_000,
    "random bytes": bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8)),
    "utf-16": "id,gender,race,age,path\n000001,male,Asian,30,p\n".encode("utf-16"),
}


@pytest.mark.parametrize("csv", ["train/train.csv", "eval/info.csv", "label_fixes.csv"])
@pytest.mark.parametrize("content", list(HOSTILE_CSVS), ids=list(HOSTILE_CSVS))
def test_a_hostile_csv_is_named_in_a_short_message(tmp_path, data_copy, csv, content):
    (data_copy / csv).write_bytes(HOSTILE_CSVS[content])
    with pytest.raises(DataError) as caught:
        check.run(make_config(tmp_path, data_copy))
    message = str(caught.value)
    assert str(data_copy / csv) in message
    assert len(message) < 600 and "\0" not in message, message[:600]


def test_a_huge_field_is_quoted_short_and_escaped(tmp_path, data_copy):
    path = data_copy / "train" / "train.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[0, "gender"] = "\x07" + "y" * 200_000
    frame.loc[1, "age"] = "9" * 100_000 + "x"
    frame.loc[2, "id"] = "z" * 100_000
    frame.to_csv(path, index=False)
    with pytest.raises(DataError) as caught:
        check.run(make_config(tmp_path, data_copy))
    problems = caught.value.problems
    assert any("row 1" in p and "gender '\\x07yyy" in p and "(200001 characters) is not 'male' or 'female'" in p
               for p in problems), problems
    assert any("row 2" in p and "(100001 characters) is not an integer" in p for p in problems)
    assert all(len(p) < 400 for p in problems), [len(p) for p in problems]
