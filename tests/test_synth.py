"""The demo dataset generator: layout, labels, statistics, reproducibility, rerun behaviour."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.data import synth
from pipeline.errors import MaskfoldError
from pipeline.stages import synth as synth_stage
from pipeline.config import load_config
from pipeline.labels import IMAGE_STEMS, OFFICIAL_OLD, age_band, class_index

SIZE = [96, 128]


def _cfg(out: Path, **synth_overrides) -> dict:
    overrides = {"out": str(out), "people": 12, "eval_people": 4, "image_size": SIZE, "workers": 1, **synth_overrides}
    return load_config(None, [f"synth.{k}={json.dumps(v)}" for k, v in overrides.items()])


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "demo"
    cfg = _cfg(out, people=40, eval_people=6, label_noise=0.1)
    return out, synth_stage.run(cfg)


def test_synth_writes_the_competition_layout(demo):
    out, result = demo
    train = _rows(out / "train" / "train.csv")
    assert list(train[0]) == ["id", "gender", "race", "age", "path"]
    assert len(train) == 40 == result["train_people"]
    ids = [row["id"] for row in train]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    for row in train:
        assert re.fullmatch(r"\d{6}(-1)?", row["id"])
        assert row["gender"] in ("male", "female")
        assert 18 <= int(row["age"]) <= 60
        assert row["path"] == f"{row['id']}_{row['gender']}_{row['race']}_{row['age']}"
        files = sorted((out / "train" / "images" / row["path"]).iterdir())
        assert sorted(p.stem for p in files) == sorted(IMAGE_STEMS)
        assert {p.suffix for p in files} <= {".jpg", ".jpeg", ".png"}
    folders = {p.name for p in (out / "train" / "images").iterdir()}
    assert folders == {row["path"] for row in train}

    info = _rows(out / "eval" / "info.csv")
    assert list(info[0]) == ["ImageID", "ans"]
    assert len(info) == 7 * 6 == result["eval_images"]
    assert all(row["ans"] == "0" for row in info)
    assert all(re.fullmatch(r"[0-9a-f]{40}\.jpg", row["ImageID"]) for row in info)
    assert {p.name for p in (out / "eval" / "images").iterdir()} == {row["ImageID"] for row in info}


def test_every_image_decodes_at_the_configured_size(demo):
    out, _ = demo
    images = list((out / "train" / "images").rglob("*.*")) + list((out / "eval" / "images").glob("*.jpg"))
    assert len(images) == 7 * (40 + 6)
    for path in images:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert image is not None, path
        assert image.shape == (SIZE[1], SIZE[0], 3)


def test_eval_answers_live_outside_eval(demo):
    out, result = demo
    assert Path(result["eval_answers"]) == out / "eval_answers.csv"
    assert not list((out / "eval").rglob("*answer*"))
    answers = _rows(out / "eval_answers.csv")
    assert list(answers[0]) == ["ImageID", "ans", "mask", "gender", "age_band"]
    info = _rows(out / "eval" / "info.csv")
    assert [a["ImageID"] for a in answers] == [i["ImageID"] for i in info]
    for row in answers:
        mask, gender, band = int(row["mask"]), int(row["gender"]), int(row["age_band"])
        assert int(row["ans"]) == class_index(mask, gender, band)
    masks = [int(a["mask"]) for a in answers]
    assert masks.count(0) == 5 * 6 and masks.count(1) == 6 and masks.count(2) == 6


def test_eval_rows_are_shuffled(demo):
    out, _ = demo
    masks = [int(a["mask"]) for a in _rows(out / "eval_answers.csv")]
    assert masks != sorted(masks)
    first_person = masks[:7]
    assert first_person != [0, 0, 0, 0, 0, 1, 2]


def test_label_noise_changes_the_record_not_the_person(demo):
    out, result = demo
    meta = json.loads((out / "synth.json").read_text())
    noise = meta["label_noise"]
    assert len(noise) == result["mislabeled_people"] == 4 + 1   # 10% of 40 gender or age; 2% of 40 mask swaps
    assert sum(e["field"] == "swap_mask" for e in noise) == 1
    truth = {p["id"]: p for p in synth.sample_people(0, 40)}
    recorded = {row["id"]: row for row in _rows(out / "train" / "train.csv")}
    for entry in noise:
        row, person = recorded[entry["id"]], truth[entry["id"]]
        assert entry["path"] == row["path"]
        if entry["field"] == "swap_mask":  # the record is right; the two photos carry each other's names
            assert int(row["age"]) == person["age"] and row["gender"] == ("female" if person["gender"] else "male")
        elif entry["field"] == "gender":
            assert row["gender"] == entry["recorded"] != entry["true"]
            assert entry["true"] == ("female" if person["gender"] else "male")
        else:
            assert int(row["age"]) == entry["recorded"] and entry["true"] == person["age"]
            assert age_band(entry["recorded"], OFFICIAL_OLD) != age_band(entry["true"], OFFICIAL_OLD)
    clean = set(recorded) - {e["id"] for e in noise if e["field"] != "swap_mask"}
    for person_id in clean:
        person = truth[person_id]
        assert int(recorded[person_id]["age"]) == person["age"]
        assert recorded[person_id]["gender"] == ("female" if person["gender"] else "male")


def test_a_planted_mask_swap_saves_each_photo_under_the_others_name(demo, tmp_path):
    out, _ = demo
    entry = next(e for e in json.loads((out / "synth.json").read_text())["label_noise"] if e["field"] == "swap_mask")
    person = next(p for p in synth.sample_people(0, 40) if p["id"] == entry["id"])
    plain = tmp_path / "plain"
    synth.render_person(0, "train", person["index"], person["gender"], person["age"], tuple(SIZE), str(plain))
    files = {f.stem: f for f in (out / "train" / "images" / entry["path"]).iterdir()}
    unswapped = {f.stem: f for f in plain.iterdir()}
    assert files["incorrect_mask"].read_bytes() == unswapped["normal"].read_bytes()
    assert files["normal"].read_bytes() == unswapped["incorrect_mask"].read_bytes()
    assert files["mask1"].read_bytes() == unswapped["mask1"].read_bytes()


def test_synth_json_records_counts_config_seed_commit_and_hash(demo):
    out, result = demo
    meta = json.loads((out / "synth.json").read_text())
    assert meta["counts"]["train_people"] == 40 and meta["counts"]["eval_images"] == 42
    assert meta["synth"]["people"] == 40 and meta["seed"] == 0
    assert meta["key"] == result["config_hash"]
    assert meta["git_commit"]
    assert not (out / ".synth_incomplete").exists()


def test_synth_is_reproducible_for_the_same_seed(tmp_path):
    one = synth_stage.run(_cfg(tmp_path / "one", workers=1))
    two = synth_stage.run(_cfg(tmp_path / "two", workers=2))
    assert one["config_hash"] == two["config_hash"]
    tree_one, tree_two = _tree(tmp_path / "one"), _tree(tmp_path / "two")
    assert tree_one.keys() == tree_two.keys()
    differing = [name for name in tree_one if tree_one[name] != tree_two[name]]
    assert differing == ["synth.json"], differing   # it names the output folder and the worker count
    meta_one, meta_two = (json.loads(tree["synth.json"]) for tree in (tree_one, tree_two))
    for meta in (meta_one, meta_two):
        del meta["synth"]["out"], meta["synth"]["workers"]
    assert meta_one == meta_two


def test_another_seed_gives_other_people(tmp_path):
    synth_stage.run(_cfg(tmp_path / "a", people=6, eval_people=1))
    synth_stage.run(_cfg(tmp_path / "b", people=6, eval_people=1, seed=1))
    assert _tree(tmp_path / "a") != _tree(tmp_path / "b")


def test_a_bigger_run_starts_with_the_same_people():
    assert synth.sample_people(3, 50)[:20] == synth.sample_people(3, 20)


def test_synth_gender_and_age_match_real_statistics():
    people = synth.sample_people(0, 3000)
    female = np.mean([p["gender"] for p in people])
    assert abs(female - 0.61) < 0.03
    ages = np.array([p["age"] for p in people])
    assert ages.min() == 18 and ages.max() == 60
    real = np.repeat(synth.AGES, synth.REAL_AGE_COUNTS)
    assert abs(ages.mean() - real.mean()) < 1.5
    drawn_bands = np.bincount(age_band(ages, OFFICIAL_OLD), minlength=3) / len(ages)
    real_bands = np.bincount(age_band(real, OFFICIAL_OLD), minlength=3) / len(real)
    assert np.abs(drawn_bands - real_bands).max() < 0.03
    assert 0.06 < np.mean(ages == 60) < 0.085     # the top band is exactly 60 (192 of 2,700 real people)


def test_embedded_age_histogram_covers_18_to_60():
    assert len(synth.REAL_AGE_COUNTS) == 43 and sum(synth.REAL_AGE_COUNTS) == 2700
    assert list(synth.AGES[[0, -1]]) == [18, 60]


def test_ids_are_six_digits_increasing_and_some_carry_a_suffix():
    ids = [p["id"] for p in synth.sample_people(0, 3000)]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    assert all(re.fullmatch(r"\d{6}(-1)?", i) for i in ids)
    assert 0.015 < np.mean([i.endswith("-1") for i in ids]) < 0.045


def test_age_cues_grow_with_age():
    rng = lambda: np.random.default_rng(7)  # same person, only the age differs
    young, middle, old = (synth._identity(rng(), 1, age) for age in (20, 45, 60))
    assert young["grey"] == 0 and young["lines"] == 0
    assert young["grey"] < middle["grey"] < old["grey"]
    assert middle["lines"] < old["lines"]
    near_57, at_60 = synth._identity(rng(), 1, 57), old
    assert abs(near_57["grey"] - at_60["grey"]) < 0.15


def test_masks_change_the_lower_face_only():
    rng = np.random.default_rng(3)
    ident = synth._identity(rng, 0, 30)
    style = synth._mask_style(rng)
    render = lambda placement: synth._render_image(np.random.default_rng(5), ident, placement, style, (192, 256))
    bare, worn, chin = render(None), render("worn"), render("chin")
    centre = slice(192 * 2 // 5, 192 * 3 // 5)   # the middle of the face, away from the ear loops
    changed = lambda image: np.abs(image[:, centre].astype(int) - bare[:, centre].astype(int)).sum(axis=2) > 30
    worn_rows, chin_rows = np.nonzero(changed(worn))[0], np.nonzero(changed(chin))[0]
    assert worn_rows.size and chin_rows.size
    assert worn_rows.min() < chin_rows.min()   # a worn mask reaches higher (over the nose)
    assert worn_rows.min() > 256 * 0.3         # but never over the eyes and brows


def test_synth_skips_an_unchanged_config_and_redoes_with_force(tmp_path, capsys):
    cfg = _cfg(tmp_path / "d", people=3, eval_people=1)
    first = synth_stage.run(cfg)
    csv_path = Path(first["train_csv"])
    stamp = csv_path.stat().st_mtime_ns
    again = synth_stage.run(cfg)
    assert again["skipped"] and "skipped" in capsys.readouterr().out
    assert csv_path.stat().st_mtime_ns == stamp
    assert synth_stage.run(_cfg(tmp_path / "d", people=3, eval_people=1, workers=2))["skipped"]  # workers change nothing
    forced = synth_stage.run(cfg, force=True)
    assert not forced["skipped"] and csv_path.stat().st_mtime_ns != stamp


def test_a_changed_config_replaces_the_old_dataset(tmp_path):
    synth_stage.run(_cfg(tmp_path / "d", people=5, eval_people=2))
    synth_stage.run(_cfg(tmp_path / "d", people=3, eval_people=1))
    assert len(list((tmp_path / "d" / "train" / "images").iterdir())) == 3
    assert len(list((tmp_path / "d" / "eval" / "images").iterdir())) == 7


def test_synth_refuses_to_write_into_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(MaskfoldError, match="refusing"):
        synth_stage.run(_cfg(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_killed_synth_run_is_redone_not_skipped(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path / "d", people=3, eval_people=1)
    synth_stage.run(cfg)
    real = synth.write_known_fixes

    def killed(path, noise):
        raise KeyboardInterrupt("killed before the fixes file")

    monkeypatch.setattr(synth, "write_known_fixes", killed)
    with pytest.raises(KeyboardInterrupt):
        synth_stage.run(cfg, force=True)  # the same dataset again, killed halfway
    monkeypatch.setattr(synth, "write_known_fixes", real)
    again = synth_stage.run(cfg)
    assert not again["skipped"] and (tmp_path / "d" / "label_fixes.csv").exists()
    assert synth_stage.run(cfg)["skipped"]
