"""Pseudo-labels (pseudo stage, pseudo.labels) and a distilled student (distill.teacher): what a run learns from
another run's ensemble (pipeline/data/pseudo.py)."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import labels
from pipeline.config import with_values
from pipeline.data.dataset import load_train_data
from pipeline.data.pseudo import ENSEMBLE_PROBS, choose, read_pseudo, teacher_tables
from pipeline.errors import ArtifactError, DataError, StaleArtifactError
from pipeline.io import load_npz
from pipeline.stages import pseudo
from pipeline.train import loop
from pipeline.train.losses import LOSSES, class_weights, loss_fn, soft_loss

ALL_PASS = {"pseudo.thresholds.mask": 0.3, "pseudo.thresholds.gender": 0.5, "pseudo.thresholds.age": 0.3}


@pytest.fixture
def teacher(gate_run, tmp_path):
    """A copy of the finished tiny run (checkpoints, tables, ensemble outputs) in a run folder of this test's own."""
    out = tmp_path / "teacher"
    shutil.copytree(gate_run["tmp"] / "run", out, symlinks=True, ignore=shutil.ignore_patterns("bundle*", "predict"))
    return with_values(gate_run["cfg"], {"output.dir": str(out)})


def test_the_ensemble_writes_its_probabilities_for_a_teacher(gate_run):
    run = gate_run["tmp"] / "run"
    tables = teacher_tables(run / ENSEMBLE_PROBS)
    submission = pd.read_csv(run / "submission.csv", dtype={"ImageID": str})
    assert list(tables["eval"]["image_id"]) == list(submission["ImageID"])
    np.testing.assert_array_equal(tables["eval"]["joint"].argmax(1), submission["ans"])  # the submission's probabilities
    oof = load_npz(run / "oof" / "mobilenetv3_small_050.npz")
    assert sorted(tables["oof"]["image_id"]) == sorted(oof["image_id"])
    np.testing.assert_allclose(tables["oof"]["joint"].sum(1), 1, atol=1e-5)


def test_choose_keeps_a_head_only_at_its_threshold():
    probs = {"mask": np.array([[0.96, 0.02, 0.02], [0.5, 0.3, 0.2]]), "gender": np.array([[0.95, 0.05], [0.2, 0.8]]),
             "age": np.array([[0.1, 0.85, 0.05], [0.1, 0.1, 0.8]])}
    probs["joint"] = labels.joint_from_heads(probs["mask"], probs["gender"], probs["age"])
    table = choose(probs, ["a.jpg", "b.jpg"], {"mask": 0.95, "gender": 0.9, "age": 0.8})
    assert table["mask"].tolist() == [0, -1]
    assert table["gender"].tolist() == [0, -1]
    assert table["age"].tolist() == [1, 2]
    assert table["class"].tolist() == list(probs["joint"].argmax(1))


def test_pseudo_stage_labels_the_eval_images_and_never_replaces_a_table_silently(teacher):
    cfg = with_values(teacher, ALL_PASS)
    stamp = pseudo.run(cfg)
    table = pd.read_csv(f"{cfg['output']['dir']}/pseudo/pseudo.csv", dtype={"ImageID": str})
    probs = teacher_tables(f"{cfg['output']['dir']}/{ENSEMBLE_PROBS}")["eval"]
    for head in labels.HEADS:  # thresholds every argmax reaches: every label is the ensemble's argmax
        np.testing.assert_array_equal(table[head], probs[head].argmax(1))
    assert stamp["labelled"]["all"] == len(table) == len(probs["image_id"])
    assert set(stamp["accuracy"]) == set(labels.HEADS)  # the demo's held-out answers score the kept labels
    stricter = with_values(cfg, {"pseudo.thresholds.gender": 1.0})
    with pytest.raises(StaleArtifactError, match="never replaced silently"):
        pseudo.run(stricter)
    assert len(pd.read_csv(f"{cfg['output']['dir']}/pseudo/pseudo.csv")) == len(table)  # the first round is kept
    pseudo.run(stricter, force=True)
    assert (pd.read_csv(f"{cfg['output']['dir']}/pseudo/pseudo.csv")["gender"] == -1).all()
    own = with_values(cfg, {"pseudo.labels": f"{cfg['output']['dir']}/pseudo/pseudo.csv"})
    with pytest.raises(ArtifactError, match="this run trained on it"):
        pseudo.run(own, force=True)


def test_pseudo_stage_refuses_probabilities_the_ensemble_did_not_record(teacher):
    out = teacher["output"]["dir"]
    arrays = dict(np.load(f"{out}/{ENSEMBLE_PROBS}"))
    arrays["eval_joint"] = arrays["eval_joint"][::-1].copy()
    np.savez(f"{out}/{ENSEMBLE_PROBS}", **arrays)
    with pytest.raises(StaleArtifactError, match="not the one"):
        pseudo.run(teacher)


def test_a_bad_pseudo_table_is_refused_naming_file_and_row(tmp_path):
    path = tmp_path / "pseudo.csv"
    path.write_text("ImageID,mask,gender,age,class,mask_p,gender_p,age_p\n"
                    "a.jpg,0,1,2,11,0.99,0.99,0.99\nzz.jpg,0,1,2,11,1,1,1\na.jpg,3,1,2,11,1,1,1\n")
    with pytest.raises(DataError) as error:
        read_pseudo(path, ["a.jpg", "b.jpg"])
    text = str(error.value)
    assert f"{path} row 3: ImageID 'zz.jpg' is not an eval image" in text
    assert f"{path} row 4: ImageID 'a.jpg' repeats row 2" in text
    assert f"{path} row 4: mask '3' is not an integer in -1..2" in text


def test_pseudo_labelled_images_train_every_fold_and_validate_none(teacher, tmp_path):
    cfg = with_values(teacher, ALL_PASS)
    pseudo.run(cfg)
    table = f"{cfg['output']['dir']}/pseudo/pseudo.csv"
    second = with_values(teacher, {"pseudo.labels": table, "output.dir": str(tmp_path / "round2"),
                                   "train.epochs": 1, "train.folds": [0], "model.backbones": ["mobilenetv3_small_050"]})
    data = load_train_data(second)
    added = np.flatnonzero(data.table["image_id"].str.startswith("eval/").to_numpy())
    chosen = pd.read_csv(table, dtype={"ImageID": str})
    assert len(added) == len(chosen) and (data.fold[added] == -1).all()
    np.testing.assert_array_equal(data.train_targets["gender"][added], chosen["gender"])
    assert "pseudo" in data.fingerprint
    for fold in range(second["folds"]["k"]):
        train_rows, val_rows = data.split(fold)
        assert set(added) <= set(train_rows) and not set(added) & set(val_rows)
    job = loop.build_job(second, "mobilenetv3_small_050", 0, data)
    assert set(added) <= set(job.batches.loader.dataset.rows)
    stamp = loop.train_job(second, "mobilenetv3_small_050", 0, data)
    val = load_npz(tmp_path / "round2" / "train" / "mobilenetv3_small_050" / "fold0" / "val_probs.npz")
    assert not any(i.startswith("eval/") for i in val["image_id"].astype(str))
    assert stamp["data_fingerprint"]["pseudo"] == data.fingerprint["pseudo"]
    plain = load_train_data(with_values(second, {"pseudo.labels": None}))
    assert "pseudo" not in plain.fingerprint and len(plain.table) == len(data.table) - len(added)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("weighted", [False, True])
def test_an_unknown_head_adds_no_loss(name, weighted):
    torch.manual_seed(0)
    logits, target = torch.randn(6, 3), torch.tensor([0, 2, -1, 1, -1, 2])
    weight = class_weights(np.array([0, 0, 1, 2, 2, 2]), 3) if weighted else None
    compute = loss_fn(name, weight, 0.1, 2.0)
    known = target >= 0
    assert torch.isclose(compute(logits, target), compute(logits[known], target[known]), atol=1e-6)
    assert torch.isfinite(compute(logits, torch.full((6,), -1)))  # a batch with no known label: zero, not NaN


def test_the_students_targets_are_the_teachers_probabilities(teacher, tmp_path):
    probs = f"{teacher['output']['dir']}/{ENSEMBLE_PROBS}"
    student = with_values(teacher, {"distill.teacher": probs, "output.dir": str(tmp_path / "student"),
                                    "model.backbones": ["mobilenetv3_small_050"], "train.epochs": 1, "train.folds": [0]})
    data = load_train_data(student)
    tables = teacher_tables(probs)
    train_ids = data.table["image_id"].to_numpy()
    position = {i: n for n, i in enumerate(tables["oof"]["image_id"].astype(str))}
    first = np.array([position[i] for i in train_ids[data.fold >= 0]])
    for key in labels.TABLE_KEYS:
        np.testing.assert_array_equal(data.soft_targets[key][data.fold >= 0], tables["oof"][key][first])
        np.testing.assert_array_equal(data.soft_targets[key][data.fold == -1], tables["eval"][key])
    job = loop.build_job(student, "mobilenetv3_small_050", 0, data)
    assert {key for key, _ in job.criteria.values()} == {f"soft_{h}" for h in labels.HEADS}
    images, targets = next(iter(job.batches.epoch(0)))
    soft = torch.as_tensor(data.soft_targets["gender"])
    # every drawn row's soft target is one of the teacher's rows
    for row in targets["soft_gender"]:
        assert (soft == row).all(1).any()
    stamp = loop.train_job(student, "mobilenetv3_small_050", 0, data)
    assert stamp["data_fingerprint"]["teacher"] == data.fingerprint["teacher"]


def test_soft_loss_is_cross_entropy_to_the_teacher():
    logits = torch.randn(4, 3)
    target = torch.softmax(torch.randn(4, 3), 1)
    expected = torch.nn.functional.cross_entropy(logits, target)  # torch's soft-label cross-entropy
    assert torch.isclose(soft_loss(logits, target), expected, atol=1e-6)


def test_pseudo_labels_and_a_teacher_together_are_refused(teacher, tmp_path):
    cfg = with_values(teacher, ALL_PASS)
    pseudo.run(cfg)
    both = with_values(teacher, {"pseudo.labels": f"{cfg['output']['dir']}/pseudo/pseudo.csv",
                                 "distill.teacher": f"{cfg['output']['dir']}/{ENSEMBLE_PROBS}"})
    with pytest.raises(DataError, match="both set"):
        load_train_data(both)
