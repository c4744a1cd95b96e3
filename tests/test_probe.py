"""Issue 20, item 5: what the reliability probe got through, each now refused with a message naming the thing.

The YAML alias bomb and the config size cap are in tests/test_config.py (the loader's own file)."""
import re
import socket

import pandas as pd
import pytest

from pipeline import io, study
from pipeline.config import load_config
from pipeline.data.folds import folds_path, load_folds
from pipeline.data.layout import load_eval, load_train
from pipeline.errors import ArtifactError, ConfigError, DataError, MaskfoldError, StaleArtifactError
from pipeline.stages import check, folds, train
from tests.conftest import make_config

# ---------------------------------------------------------------- passwords


SECRETS = {
    "postgresql://u@db.example/optuna?password=s3cr3t-a": "postgresql://u@db.example/optuna?password=***",
    "postgresql://u@db.example/optuna?sslmode=require&PassWord=s3cr3t-b":
        "postgresql://u@db.example/optuna?sslmode=require&PassWord=***",
    "mysql://u@db.example/optuna?pwd=s3cr3t-c&charset=utf8": "mysql://u@db.example/optuna?pwd=***&charset=utf8",
    "postgresql://u@db.example/optuna?pass=s3cr3t-d": "postgresql://u@db.example/optuna?pass=***",
    "postgresql://u@db.example/optuna?client_secret=s3cr3t-e": "postgresql://u@db.example/optuna?client_secret=***",
    "postgresql://u@db.example/optuna?TOKEN=s3cr3t-f": "postgresql://u@db.example/optuna?TOKEN=***",
    "postgresql://u:s3cr3t-g@db.example/optuna": "postgresql://u:***@db.example/optuna",
    "postgresql://u:s3cr3t-h@with-at@db.example/optuna": "postgresql://u:***@db.example/optuna",
    "postgresql:///optuna?host=/run/pg&user=u;sslpassword=s3cr3t-i":
        "postgresql:///optuna?host=/run/pg&user=u;sslpassword=***",
}


@pytest.mark.parametrize("url", list(SECRETS))
def test_every_password_form_of_a_storage_url_is_masked_in_a_jobs_config(tmp_path, url):
    """A query-string password (?password=...) used to reach every job's config.yaml as it was written."""
    cfg = load_config("configs/demo.yaml", [f"tune.storage={url}"])
    io.write_provenance(tmp_path, cfg, seed=0)
    written = (tmp_path / "config.yaml").read_text() + (tmp_path / "meta.json").read_text()
    assert "s3cr3t" not in written
    assert f"storage: {SECRETS[url]}" in written
    assert io.redacted(url) == SECRETS[url]


def test_a_config_error_never_quotes_a_password():
    with pytest.raises(ConfigError) as caught:
        load_config("configs/demo.yaml", ["tune.storage=ftp://u@db.example/x?password=s3cr3t", "train.epochs=0"])
    assert "s3cr3t" not in str(caught.value) and "password=***" in str(caught.value)


def test_an_unreachable_postgresql_is_one_line_naming_the_storage_with_its_password_masked():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://u:pw-one@127.0.0.1:{port}/optuna?password=pw-two"
    cfg = load_config("configs/demo.yaml", [f"tune.storage={url}"])
    with pytest.raises(MaskfoldError) as caught:
        study.load_study(cfg)
    message = str(caught.value)
    assert "\n" not in message and "pw-one" not in message and "pw-two" not in message, message
    assert message.startswith(f"tune.storage postgresql://u:***@127.0.0.1:{port}/optuna?password=***: "
                              f"cannot open the study storage (")
    assert "Connection refused" in message and "check that the database server is running" in message


# ---------------------------------------------------------------- folds files edited by hand


def _hand_edited_folds(tmp_path, tiny_data, edit):
    """Make the folds file (k=3), then change its lines (header first) with `edit`; (cfg, path, table, old lines)."""
    cfg = make_config(tmp_path, tiny_data, "folds.k=3")
    folds.run(cfg)
    path = folds_path(cfg)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(list(lines))) + "\n")
    return cfg, path, load_train(cfg)[0], lines


def _refused_where_folds_are_loaded_and_by_the_folds_stage(cfg, table, kind, expected):
    for use in (lambda: load_folds(cfg, table), lambda: folds.run(cfg)):
        with pytest.raises(kind, match=expected):
            use()


def _with_line(lines, index, line):
    return lines[:index] + [line] + lines[index + 1:]


def test_a_person_added_to_a_second_fold_is_refused_naming_the_file_the_person_and_both_rows(tmp_path, tiny_data):
    """It used to be reused as up to date, and training silently took the person's last row."""
    def add_second_fold(lines):
        person, fold = lines[1].split(",")
        return lines + [f"{person},{(int(fold) + 1) % 3}"]

    cfg, path, table, lines = _hand_edited_folds(tmp_path, tiny_data, add_second_fold)
    person = lines[1].split(",")[0]
    _refused_where_folds_are_loaded_and_by_the_folds_stage(cfg, table, ArtifactError, (
        rf"{path} rows 1 and {len(lines)} \(lines 2 and {len(lines) + 1}\): person '{person}' is listed twice "
        rf".*re-run: ./run.sh folds -c CONFIG --force"))


def test_a_fold_number_out_of_range_is_refused_at_load_naming_the_file_the_person_and_the_row(tmp_path, tiny_data):
    """It used to fail only at oof, naming neither the file nor the person. The edit keeps the file's size."""
    cfg, path, table, lines = _hand_edited_folds(
        tmp_path, tiny_data, lambda lines: _with_line(lines, 2, lines[2].split(",")[0] + ",7"))
    person = lines[2].split(",")[0]
    _refused_where_folds_are_loaded_and_by_the_folds_stage(
        cfg, table, ArtifactError,
        rf"{path} row 2 \(line 3, person '{person}'\): fold 7 is outside 0..2 \(folds.k is 3\)")


def test_a_folds_file_changed_after_it_was_made_is_stale_by_its_digest(tmp_path, tiny_data):
    """A person moved to another fold keeps the file's size and every row sound: only its digest tells."""
    def move_a_person(lines):
        person, fold = lines[1].split(",")
        return _with_line(lines, 1, f"{person},{(int(fold) + 1) % 3}")

    cfg, path, table, _ = _hand_edited_folds(tmp_path, tiny_data, move_a_person)
    _refused_where_folds_are_loaded_and_by_the_folds_stage(
        cfg, table, StaleArtifactError, rf"{path} changed after it was made .*re-run: ./run.sh folds -c CONFIG --force")
    folds.run(cfg, force=True)
    assert load_folds(cfg, table).nunique() == 3


# ---------------------------------------------------------------- label fixes that disagree


def _first_person(root):
    frame = pd.read_csv(root / "train" / "train.csv", dtype=str)
    return frame["id"][0], frame["path"][0]


def test_two_label_fixes_that_disagree_are_refused_naming_both_rows(tmp_path, data_copy):
    """The last one used to win silently. By id or by folder name, it is one person."""
    pid, folder = _first_person(data_copy)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text(f"id,field,value,reason\n{pid},age,40,a\n{pid},gender,male,b\n{folder},age,41,c\n")
    with pytest.raises(DataError, match=rf"{fixes} rows 1 and 3 \(file lines 2 and 4\): two age fixes for person "
                                        rf"'{folder}' that disagree"):
        load_train(make_config(tmp_path, data_copy, f"data.label_fixes={fixes}"))


def test_a_label_fix_repeated_with_the_same_value_is_applied_once_and_logged(tmp_path, data_copy):
    pid, folder = _first_person(data_copy)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text(f"id,field,value,reason\n{pid},gender,Female,a\n{folder},gender,female,b\n"
                     f"{pid},swap_mask,mask1:normal,c\n{pid},swap_mask,normal:mask1,d\n")
    table, info = load_train(make_config(tmp_path, data_copy, f"data.label_fixes={fixes}"))
    assert (table.loc[table["person_id"] == folder, "gender"] == 1).all()
    assert f"{folder}: gender fix skipped (row 2 repeats row 1)" in info["fixes"]
    assert f"{pid}: swap_mask fix skipped (row 4 repeats row 3)" in info["fixes"]


# ---------------------------------------------------------------- tables with a header and no rows


@pytest.mark.parametrize("csv, header, what", [("train/train.csv", "id,gender,race,age,path", "one row per person"),
                                               ("eval/info.csv", "ImageID,ans", "one row per eval image")])
def test_a_table_with_a_header_and_no_rows_is_refused_naming_the_file(tmp_path, data_copy, csv, header, what):
    """A header-only train.csv was a KeyError traceback; a header-only info.csv an empty submission and exit 0."""
    (data_copy / csv).write_text(header + "\n")
    cfg = make_config(tmp_path, data_copy)
    expected = rf"{data_copy / csv}: a header and no rows; expected {what}"
    with pytest.raises(DataError, match=expected):
        check.run(cfg)
    with pytest.raises(DataError, match=expected):
        (load_train if csv.startswith("train") else load_eval)(cfg)


# ---------------------------------------------------------------- checkpoints damaged after a job finished


ONE_JOB = ["folds.k=2", "train.folds=[0]", "model.backbones=[mobilenetv3_small_050]", "data.image_size=[32,40]",
           "train.epochs=1", "train.max_batches=1", "train.batch_size=8"]
REMAKE = re.escape("./run.sh train -c CONFIG model.backbones=[mobilenetv3_small_050] train.folds=[0] --force")


@pytest.fixture
def finished_job(tmp_path, tiny_data):
    cfg = make_config(tmp_path, tiny_data, *ONE_JOB)
    folds.run(cfg)
    train.run(cfg)
    return cfg, tmp_path / "run" / "train" / "mobilenetv3_small_050" / "fold0"


def test_a_truncated_best_checkpoint_is_not_done_and_names_the_command_that_remakes_it(finished_job):
    """It used to be reported as done, and skipped."""
    cfg, job = finished_job
    best = job / "best.pt"
    best.write_bytes(best.read_bytes()[:-1000])
    with pytest.raises(StaleArtifactError, match=rf"{best} is \d+ bytes, \d+ when it was made: truncated.*{REMAKE}"):
        train.run(cfg)
    with pytest.raises(ArtifactError, match=rf"{best}: .*remake it: {REMAKE}"):
        io.torch_load(best)
    train.run(cfg, force=True)
    assert io.torch_load(best)["fold"] == 0


def test_a_replaced_checkpoint_of_the_same_size_is_refused_where_it_is_loaded(finished_job):
    import torch

    cfg, job = finished_job
    best, last = job / "best.pt", job / "last.pt"
    other = torch.load(best, weights_only=True)
    next(iter(other["model"].values())).add_(1.0)  # other weights, the same size: the size holds, the digest not
    size = best.stat().st_size
    io.atomic_torch_save(best, other)  # as the job saves it
    assert best.stat().st_size == size
    with pytest.raises(ArtifactError, match=rf"{best}: not the checkpoint its job saved .*remake it: {REMAKE}"):
        io.torch_load(best)
    last.write_bytes(last.read_bytes()[:5000])  # no stamp records last.pt: it fails to load, and says how to remake
    with pytest.raises(ArtifactError, match=rf"{last}: cannot load checkpoint .*remake it: {REMAKE}"):
        io.torch_load(last)


# ---------------------------------------------------------------- links that leave data.root


def test_links_that_leave_data_root_are_refused_naming_link_and_target_and_never_opened(tmp_path, data_copy):
    """An image, a whole person folder and an eval image linked from outside data.root used to be followed; a link
    to a system file was opened and called corrupt."""
    people = sorted(p for p in (data_copy / "train" / "images").iterdir() if not p.name.startswith("."))
    outside = tmp_path / "outside"
    image = next(people[0].glob("mask1.*"))
    (outside / "images").mkdir(parents=True)
    target = outside / image.name
    image.rename(target)
    image.symlink_to(target)
    folder_target = outside / "images" / people[1].name
    people[1].rename(folder_target)
    people[1].symlink_to(folder_target)
    inside = next(people[2].glob("mask2.*"))  # a link that stays inside data.root is fine
    inside.unlink()
    inside.symlink_to(next(people[2].glob("mask3.*")))
    eval_image = sorted((data_copy / "eval" / "images").iterdir())[0]
    eval_image.unlink()
    eval_image.symlink_to("/etc/passwd")

    with pytest.raises(DataError) as caught:
        check.run(make_config(tmp_path, data_copy))
    problems = caught.value.problems
    suffix = f"outside data.root ({data_copy}); links that leave data.root are refused: copy what it points to " \
             f"into data.root instead"
    assert f"{image}: a link to {target}, {suffix}" in problems
    assert f"{people[1]}: a link to {folder_target}, {suffix}" in problems
    assert any(p.endswith(f": {eval_image}: a link to /etc/passwd, {suffix}") and "info.csv row" in p for p in problems)
    assert len(problems) == 3, problems  # nothing about missing or corrupt images, nothing about the inside link
