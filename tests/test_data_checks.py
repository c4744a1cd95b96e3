"""Each kind of bad input gets its own clear error naming the file or row, and every problem is listed."""
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipeline.data.layout import load_train
from pipeline.errors import DataError
from pipeline.stages import check
from tests.conftest import REAL_META, make_config


def problems_of(tmp_path, root) -> list[str]:
    with pytest.raises(DataError) as caught:
        check.run(make_config(tmp_path, root))
    return caught.value.problems


def edit_train_csv(root, edit) -> Path:
    path = root / "train" / "train.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(frame)
    frame.to_csv(path, index=False)
    return path


def first_person_folder(root) -> Path:
    frame = pd.read_csv(root / "train" / "train.csv", dtype=str)
    return root / "train" / "images" / frame["path"][0]


def test_clean_data_passes_the_check(tmp_path, data_copy):
    report = check.run(make_config(tmp_path, data_copy))
    assert report["people"] == 12 and report["images"] == 84


def test_missing_column_names_the_file_and_column(tmp_path, data_copy):
    edit_train_csv(data_copy, lambda f: f.__delitem__("age"))
    problems = problems_of(tmp_path, data_copy)
    assert any("train.csv" in p and "missing column(s) age" in p for p in problems)


def test_unknown_gender_names_the_row(tmp_path, data_copy):
    edit_train_csv(data_copy, lambda f: f.loc.__setitem__((2, "gender"), "robot"))
    problems = problems_of(tmp_path, data_copy)
    assert any("row 3" in p and "'robot'" in p for p in problems)


def test_non_integer_age_names_the_row(tmp_path, data_copy):
    edit_train_csv(data_copy, lambda f: f.loc.__setitem__((0, "age"), "abc"))
    assert any("row 1" in p and "age 'abc' is not an integer" in p for p in problems_of(tmp_path, data_copy))


def test_out_of_range_age_names_the_row(tmp_path, data_copy):
    edit_train_csv(data_copy, lambda f: f.loc.__setitem__((4, "age"), "300"))
    assert any("row 5" in p and "age 300 is outside" in p for p in problems_of(tmp_path, data_copy))


def test_duplicate_person_row_is_an_error(tmp_path, data_copy):
    def duplicate(frame):
        frame.loc[len(frame)] = frame.loc[1]
    edit_train_csv(data_copy, duplicate)
    assert any("row 13" in p and "duplicate of row 2" in p for p in problems_of(tmp_path, data_copy))


def test_missing_person_folder_names_the_folder(tmp_path, data_copy):
    folder = first_person_folder(data_copy)
    shutil.rmtree(folder)
    assert any(str(folder) in p and "person folder missing" in p for p in problems_of(tmp_path, data_copy))


def test_person_without_seven_images_names_the_missing_ones(tmp_path, data_copy):
    folder = first_person_folder(data_copy)
    next(folder.glob("mask3.*")).unlink()
    assert any(str(folder) in p and "6 of the 7" in p and "mask3" in p for p in problems_of(tmp_path, data_copy))


def test_unknown_file_name_is_named(tmp_path, data_copy):
    folder = first_person_folder(data_copy)
    (folder / "mask6.jpg").write_bytes(next(folder.glob("mask1.*")).read_bytes())
    assert any("mask6.jpg" in p and "unexpected file" in p for p in problems_of(tmp_path, data_copy))


def test_empty_image_is_named(tmp_path, data_copy):
    image = next(first_person_folder(data_copy).glob("normal.*"))
    image.write_bytes(b"")
    assert any(str(image) in p and "empty file" in p for p in problems_of(tmp_path, data_copy))


def test_corrupt_image_is_named(tmp_path, data_copy):
    image = next(first_person_folder(data_copy).glob("mask2.*"))
    image.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    assert any(str(image) in p and "corrupt" in p for p in problems_of(tmp_path, data_copy))


def test_missing_eval_image_names_the_row_and_file(tmp_path, data_copy):
    info = pd.read_csv(data_copy / "eval" / "info.csv")
    missing = data_copy / "eval" / "images" / info["ImageID"][3]
    missing.unlink()
    assert any("info.csv row 4" in p and str(missing) in p and "missing" in p for p in problems_of(tmp_path, data_copy))


@pytest.mark.parametrize("image_id", ["../x.jpg", "/etc/passwd", "sub/../../x.jpg"])
def test_eval_image_id_that_would_leave_eval_images_is_refused(tmp_path, data_copy, image_id):
    path = data_copy / "eval" / "info.csv"
    info = pd.read_csv(path)
    info.loc[0, "ImageID"] = image_id
    info.to_csv(path, index=False)
    assert any("info.csv row 1" in p and "would leave" in p for p in problems_of(tmp_path, data_copy))


def test_every_problem_is_listed_not_just_the_first(tmp_path, data_copy):
    edit_train_csv(data_copy, lambda f: f.loc.__setitem__((0, "age"), "old"))
    next(first_person_folder(data_copy).glob("mask1.*")).write_bytes(b"")
    (data_copy / "eval" / "images" / pd.read_csv(data_copy / "eval" / "info.csv")["ImageID"][0]).unlink()
    problems = problems_of(tmp_path, data_copy)
    assert len(problems) >= 3
    assert any("not an integer" in p for p in problems)
    assert any("empty file" in p for p in problems)
    assert any("missing" in p and "info.csv" in p for p in problems)


def test_unreadable_csv_is_named(tmp_path, data_copy):
    path = data_copy / "train" / "train.csv"
    path.write_bytes(b'id,gender\n"unterminated,quote\n')
    with pytest.raises(DataError, match="train.csv"):
        check.run(make_config(tmp_path, data_copy))


def test_image_extensions_match_case_insensitively(tmp_path, data_copy):
    image = next(first_person_folder(data_copy).glob("mask1.*"))
    image.rename(image.with_suffix(image.suffix.upper()))
    table, _ = load_train(make_config(tmp_path, data_copy))
    assert len(table) == 84


def test_label_fixes_are_applied_and_logged(tmp_path, data_copy):
    frame = pd.read_csv(data_copy / "train" / "train.csv", dtype=str)
    pid, folder = frame["id"][0], frame["path"][0]
    fixes = tmp_path / "fixes.csv"
    fixes.write_text(f"id,field,value,reason\n{pid},gender,"
                     f"{'male' if frame['gender'][0] == 'female' else 'female'},test\n{pid},swap_mask,incorrect_mask:normal,test\n")
    cfg = make_config(tmp_path, data_copy, f"data.label_fixes={fixes}")
    table, info = load_train(cfg)
    rows = table[table["person_id"] == folder].set_index("stem")
    assert rows.loc["incorrect_mask", "mask"] == 2 and rows.loc["normal", "mask"] == 1
    assert (rows["gender"] == (0 if frame["gender"][0] == "female" else 1)).all()
    assert len([line for line in info["fixes"] if "skipped" not in line]) == 2


def test_a_label_fix_with_an_impossible_age_is_listed_with_every_other_problem(tmp_path, data_copy):
    frame = pd.read_csv(data_copy / "train" / "train.csv", dtype=str)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text(f"id,field,value,reason\n{frame['id'][0]},age,500,typo\n")
    edit_train_csv(data_copy, lambda f: f.loc.__setitem__((1, "gender"), "robot"))
    with pytest.raises(DataError) as caught:
        check.run(make_config(tmp_path, data_copy, f"data.label_fixes={fixes}"))
    problems = caught.value.problems
    assert any("fixes.csv row 1" in p and "age 500 is outside 1..120" in p for p in problems)
    assert any("row 2" in p and "'robot'" in p for p in problems)  # the bad fix hides nothing else


@pytest.mark.skipif(not (REAL_META / "train.csv").exists(), reason="real metadata not present")
def test_real_metadata_ingests_with_the_real_counts(tmp_path):
    from pipeline.data.layout import read_people
    from pipeline import labels

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "train.csv").symlink_to(REAL_META / "train.csv")
    people, problems, warnings = read_people(tmp_path)
    assert problems == [] and people["valid"].all()
    assert len(people) == 2700
    bands = labels.age_band(people["age"].to_numpy(), 60)
    assert [(bands == b).sum() for b in range(3)] == [1281, 1227, 192]
    assert (people["gender"] == 1).sum() == 1655 and (people["gender"] == 0).sum() == 1045
    assert any("000600-1" == i for i in people["id"])
    assert len(warnings) == 1 and "003397" in warnings[0]  # the real file reuses one id for two people


def test_a_label_fix_by_an_id_two_people_share_is_refused_and_one_by_folder_fixes_one(tmp_path, data_copy):
    """The real train.csv gives id 003397 to two people: a fix by that id must not change both."""
    edit_train_csv(data_copy, lambda f: f.loc.__setitem__((1, "id"), f.loc[0, "id"]))
    frame = pd.read_csv(data_copy / "train" / "train.csv", dtype=str)
    shared, first, second = frame["id"][0], frame["path"][0], frame["path"][1]
    fixes = tmp_path / "fixes.csv"
    fixes.write_text(f"id,field,value,reason\n{shared},age,50,by id\n")
    with pytest.raises(DataError, match=rf"fixes.csv row 1 \(id '{shared}'\): the id names 2 people .*{first}.*{second}"):
        load_train(make_config(tmp_path, data_copy, f"data.label_fixes={fixes}"))
    fixes.write_text(f"id,field,value,reason\n{second},age,50,by folder\n")
    table, _ = load_train(make_config(tmp_path, data_copy, f"data.label_fixes={fixes}"))
    ages = table.groupby("person_id")["age"].first()
    assert ages[second] == 50 and ages[first] == int(frame["age"][0])
