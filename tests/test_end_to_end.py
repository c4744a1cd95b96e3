"""One tiny run of every stage on generated data: synth -> check -> folds -> train -> oof -> infer -> ensemble."""
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from pipeline import check, ensemble, folds, infer, oof, synth, train
from pipeline.io import load_npz
from tests.conftest import make_config

TINY = ["synth.people=60", "synth.eval_people=6", "synth.image_size=[96,128]", "data.image_size=[40,48]",
        "folds.k=3", "model.backbones=[mobilenetv3_small_050]", "train.epochs=15", "train.patience=15", "train.batch_size=16",
        "train.lr=0.05", "infer.tta=[none,hflip]"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = make_config(tmp, tmp / "data", *TINY)
    synth.run(cfg)
    check.run(cfg)
    folds.run(cfg)
    summaries = train.run(cfg)
    reports = oof.run(cfg)
    infer.run(cfg)
    result = ensemble.run(cfg)
    return {"cfg": cfg, "tmp": tmp, "summaries": summaries, "oof": reports, "ensemble": result}


def test_tiny_run_learns_at_least_three_times_chance(tiny_run):
    pooled = load_npz(tiny_run["tmp"] / "run" / "oof" / "mobilenetv3_small_050.npz")
    label = pooled["label"]
    rng = np.random.default_rng(0)
    uniform = np.mean([f1_score(label, rng.integers(0, 18, len(label)), labels=range(18), average="macro",
                                zero_division=0) for _ in range(20)])
    prior = np.mean([f1_score(label, rng.permutation(label), labels=range(18), average="macro", zero_division=0)
                     for _ in range(20)])
    chance = max(uniform, prior)
    assert tiny_run["oof"]["mobilenetv3_small_050"]["f1"] >= 3 * chance, (tiny_run["oof"]["mobilenetv3_small_050"]["f1"], chance)


def test_pooled_oof_f1_is_scikit_learns_f1_on_the_pooled_table(tiny_run):
    pooled = load_npz(tiny_run["tmp"] / "run" / "oof" / "mobilenetv3_small_050.npz")
    expected = f1_score(pooled["label"], pooled["probs_joint"].argmax(1), labels=list(range(18)), average="macro",
                        zero_division=0)
    report = json.loads((tiny_run["tmp"] / "run" / "oof" / "report.json").read_text())
    assert report["backbones"]["mobilenetv3_small_050"]["f1"] == pytest.approx(expected, abs=1e-12)
    # pooled, not the mean of the fold scores
    assert len(pooled["label"]) == 60 * 7 and set(pooled["fold"]) == {0, 1, 2}


def test_oof_report_has_plots_and_tables(tiny_run):
    folder = tiny_run["tmp"] / "run" / "oof"
    for name in ("report.md", "report.json", "confusion_mobilenetv3_small_050.png", "per_class_f1.png"):
        assert (folder / name).stat().st_size > 0
    assert (folder / "confusion_mobilenetv3_small_050.png").read_bytes()[:4] == b"\x89PNG"
    assert "| mobilenetv3_small_050 |" in (folder / "report.md").read_text()


def test_every_train_artifact_records_config_seed_and_commit(tiny_run):
    job = tiny_run["tmp"] / "run" / "train" / "mobilenetv3_small_050" / "fold0"
    meta = json.loads((job / "meta.json").read_text())
    assert {"seed", "git_commit", "job_hash", "data_fingerprint"} <= set(meta)
    assert (job / "config.yaml").exists()
    lines = (job / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == json.loads((job / "done.json").read_text())["epochs_run"]
    assert {"val_f1", "val_f1_mask", "lr", "images_per_s", "loss_mask"} <= set(json.loads(lines[0]))


def test_submission_has_info_csv_rows_in_order_with_integer_classes(tiny_run):
    cfg = tiny_run["cfg"]
    submission = pd.read_csv(tiny_run["tmp"] / "run" / "submission.csv", dtype={"ImageID": str})
    info = pd.read_csv(tiny_run["tmp"] / "data" / "eval" / "info.csv", dtype={"ImageID": str})
    assert list(submission.columns) == ["ImageID", "ans"]
    assert submission["ImageID"].tolist() == info["ImageID"].tolist()
    assert submission["ans"].between(0, 17).all() and submission["ans"].dtype.kind == "i"
    report = json.loads((tiny_run["tmp"] / "run" / "ensemble.json").read_text())
    assert {"members", "weights", "ensemble", "git_commit", "seed", "config"} <= set(report)
    assert cfg["output"]["dir"] in report["submission"]


def test_check_submission_refuses_bad_rows():
    info = pd.DataFrame({"ImageID": ["a.jpg", "b.jpg"], "ans": [0, 0]})
    with pytest.raises(RuntimeError, match="order"):
        ensemble.check_submission(pd.DataFrame({"ImageID": ["b.jpg", "a.jpg"], "ans": [1, 2]}), info)
    with pytest.raises(RuntimeError, match="integers"):
        ensemble.check_submission(pd.DataFrame({"ImageID": ["a.jpg", "b.jpg"], "ans": [1, 18]}), info)
    with pytest.raises(RuntimeError, match="integers"):
        ensemble.check_submission(pd.DataFrame({"ImageID": ["a.jpg", "b.jpg"], "ans": [1.5, 2.0]}), info)
    ensemble.check_submission(pd.DataFrame({"ImageID": ["a.jpg", "b.jpg"], "ans": [1, 17]}), info)


def test_a_missing_fold_checkpoint_is_an_error_naming_it(tiny_run, tmp_path):
    import shutil

    cfg = tiny_run["cfg"]
    best = tiny_run["tmp"] / "run" / "train" / "mobilenetv3_small_050" / "fold1" / "best.pt"
    moved = tmp_path / "best.pt"
    shutil.move(best, moved)
    try:
        with pytest.raises(infer.MissingCheckpointError, match=str(best)):
            infer.run(cfg)
    finally:
        shutil.move(moved, best)


def test_oof_refuses_a_backbone_with_incomplete_folds(tiny_run, tmp_path):
    import shutil

    val = tiny_run["tmp"] / "run" / "train" / "mobilenetv3_small_050" / "fold2" / "val_probs.npz"
    moved = tmp_path / "val_probs.npz"
    shutil.move(val, moved)
    try:
        with pytest.raises(oof.IncompleteFoldsError, match="fold 2"):
            oof.run(tiny_run["cfg"])
    finally:
        shutil.move(moved, val)


def test_stages_skip_finished_work(tiny_run, capsys):
    train.run(tiny_run["cfg"])
    infer.run(tiny_run["cfg"])
    out = capsys.readouterr().out
    assert out.count("skipping") == 6  # 3 train jobs + 3 infer jobs


def test_ensemble_refuses_eval_tables_made_with_another_tta(tiny_run):
    from pipeline.config import with_values

    changed = with_values(tiny_run["cfg"], {"infer.tta": ["none"]})
    with pytest.raises(RuntimeError, match="rerun the infer stage"):
        ensemble.run(changed)
