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
from pipeline.data.pixels import image_set
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


# ---------------------------------------------------------------- folds files


def test_a_folds_file_without_its_fingerprint_that_differs_is_refused_naming_force(tmp_path, tiny_data):
    cfg = make_config(tmp_path, tiny_data, "folds.k=3")
    folds.run(cfg)
    path = folds_path(cfg)
    folds_artifact(cfg, load_train(cfg)[0]).stamp_path.unlink()
    foreign = path.read_text().replace(",0\n", ",9\n")  # a file made by hand, or for other data
    path.write_text(foreign)
    with pytest.raises(StaleArtifactError, match=r"has no fingerprint.*replace it: \./run\.sh folds -c CONFIG --force"):
        folds.run(cfg)
    assert path.read_text() == foreign  # left as it was
    folds.run(cfg, force=True)
    assert path.read_text() != foreign


def test_a_folds_file_without_its_fingerprint_that_holds_these_folds_gets_its_fingerprint(tmp_path, tiny_data,
                                                                                            capsys):
    """What a folds run killed between the file and its stamp leaves: the next run keeps the file, stamps it."""
    cfg = make_config(tmp_path, tiny_data, "folds.k=3")
    folds.run(cfg)
    path = folds_path(cfg)
    before = path.stat().st_mtime_ns
    folds_artifact(cfg, load_train(cfg)[0]).stamp_path.unlink()
    folds.run(cfg)
    assert "had no fingerprint; it holds the folds of this data" in capsys.readouterr().out
    assert path.stat().st_mtime_ns == before
    table, _ = load_train(cfg)
    assert load_folds(cfg, table).nunique() == 3


@pytest.mark.parametrize("damage", [b"\0" * 5000, b"person_id,fold\nabc,one\n", b"who,what\n1,2\n"],
                         ids=["nul-filled", "fold not a number", "other columns"])
def test_a_damaged_folds_file_is_named_with_the_command_that_remakes_it(tmp_path, tiny_data, damage):
    cfg = make_config(tmp_path, tiny_data, "folds.k=3")
    folds.run(cfg)
    folds_path(cfg).write_bytes(damage)
    table, _ = load_train(cfg)
    with pytest.raises(ArtifactError, match=rf"{folds_path(cfg)}.*re-run: ./run.sh folds -c CONFIG --force"):
        load_folds(cfg, table)


def test_where_the_folds_file_lives_is_not_part_of_a_training_jobs_identity(tmp_path, tiny_data):
    one = make_config(tmp_path, tiny_data, "folds.k=3")
    other = make_config(tmp_path, tiny_data, "folds.k=3", f"folds.dir={tmp_path / 'elsewhere'}")
    assert train_artifact(one, "b", 0, "fp").key == train_artifact(other, "b", 0, "fp").key
    assert train_artifact(one, "b", 0, "fp").key != train_artifact(make_config(tmp_path, tiny_data, "folds.k=4"),
                                                                  "b", 0, "fp").key


# ---------------------------------------------------------------- the pixel cache and probability tables


@pytest.fixture
def cache_case(tmp_path, data_copy):
    cfg = make_config(tmp_path, data_copy)
    table, _ = load_train(cfg)
    files = list(table["file"][:5])
    expected = images.decode_images(files, cfg["data"]["crop"], cfg["data"]["image_size"], 10**8, workers=1)[0]
    files = image_set(cfg, "train", files)
    path = images.cache_path(cfg, files)
    path.parent.mkdir(parents=True, exist_ok=True)
    return cfg, files, expected, path


class _Payload:
    """Unpickling this creates a file: the proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("damage", ["python objects", "pickle", "zero-filled", "truncated", "other shape"])
def test_a_bad_cache_file_is_never_used_it_is_rebuilt_with_a_warning_naming_it(cache_case, damage, tmp_path, capsys):
    cfg, files, expected, path = cache_case
    marker = tmp_path / "pickle-ran"
    if damage == "python objects":
        np.save(path, np.array([_Payload(marker)] * 5, dtype=object), allow_pickle=True)
    elif damage == "pickle":
        path.write_bytes(pickle.dumps(_Payload(marker)))
    elif damage == "zero-filled":
        path.write_bytes(b"\0" * 4096)
    elif damage == "truncated":
        np.save(path, expected)
        path.write_bytes(path.read_bytes()[:-100])
    else:
        np.save(path, expected[:, :10])
    loaded = images.cached_images(cfg, files)
    assert f"[data] warning: cache file {path}" in capsys.readouterr().out
    np.testing.assert_array_equal(loaded, expected)
    assert not marker.exists(), "the cache file's pickle was run"
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), expected)  # replaced by the real array


@pytest.mark.parametrize("content", [b"\0" * 2048, b"not a zip", pickle.dumps({"a": 1}), b""],
                         ids=["nul-filled", "text", "pickle", "empty"])
def test_a_damaged_probability_table_is_named(tmp_path, content):
    path = tmp_path / "val_probs.npz"
    path.write_bytes(content)
    with pytest.raises(ArtifactError, match=rf"{path}: not a readable table"):
        load_npz(path)


def test_a_table_holding_python_objects_is_refused(tmp_path):
    path = tmp_path / "eval_probs.npz"
    np.savez(path, probs_joint=np.array([object()] * 3, dtype=object))
    with pytest.raises(ArtifactError, match=rf"{path}: not a readable table.*allow_pickle"):
        load_npz(path)


# ---------------------------------------------------------------- image conversions


def test_grey_rgba_and_16_bit_images_are_logged_once_per_kind_with_a_count_and_the_first_file(tmp_path, capsys):
    made = {
        "grey": [np.full((10, 12), 200, np.uint8)] * 3,
        "rgba": [np.full((10, 12, 4), 100, np.uint8)] * 2,
        "rgb16": [np.full((10, 12, 3), 40000, np.uint16)],
        "grey16": [np.full((10, 12), 40000, np.uint16)],
        "rgb": [np.full((10, 12, 3), 90, np.uint8)] * 2,
    }
    files = []
    for kind, arrays in made.items():
        for i, array in enumerate(arrays):
            files.append(tmp_path / f"{kind}{i}.png")
            cv2.imwrite(str(files[-1]), array)
    files.append(tmp_path / "grey_jpeg.jpg")
    cv2.imwrite(str(files[-1]), np.full((10, 12), 10, np.uint8))
    decoded, problems = images.decode_images(files, {"mode": "box", "box": [0, 0, 1, 1]}, [6, 5], 10**6, workers=1)
    assert problems == [] and decoded.shape == (len(files), 5, 6, 3) and decoded.dtype == np.uint8
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[data]")]
    assert sorted(lines) == sorted([
        f"[data] 4 grayscale images converted to 8-bit RGB (first: {tmp_path / 'grey0.png'})",
        f"[data] 2 RGBA images converted to 8-bit RGB (first: {tmp_path / 'rgba0.png'})",
        f"[data] 1 16-bit RGB image converted to 8-bit RGB (first: {tmp_path / 'rgb160.png'})",
        f"[data] 1 16-bit grayscale image converted to 8-bit RGB (first: {tmp_path / 'grey160.png'})",
    ])


def test_8_bit_colour_images_log_nothing(tmp_path, data_copy, capsys):
    table, _ = load_train(make_config(tmp_path, data_copy))
    images.verify_images(table["file"], 10**8, workers=1)
    assert "[data]" not in capsys.readouterr().out


# ---------------------------------------------------------------- image names that are not files


@pytest.mark.parametrize("kind", ["fifo", "folder", "link to /dev/zero"])
def test_an_image_name_that_is_not_a_regular_file_is_named_by_check_never_read(tmp_path, data_copy, kind):
    import os
    import threading

    person = sorted((data_copy / "train" / "images").iterdir())[0]
    image = next(person.glob("mask1.*"))
    image.unlink()
    unblock = threading.Timer(20, lambda: _open_the_writing_end(image))
    if kind == "fifo":
        os.mkfifo(image)
        unblock.start()  # should a regression open it, a late writer ends the wait: the test fails, never hangs
    elif kind == "folder":
        image.mkdir()
    else:
        image.symlink_to("/dev/zero")
    try:
        with pytest.raises(DataError) as caught:
            check.run(make_config(tmp_path, data_copy))
    finally:
        unblock.cancel()
    if kind == "link to /dev/zero":  # refused by where it points, before anything looks at what it is
        assert caught.value.problems == [f"{image}: a link to /dev/zero, outside data.root ({data_copy}); links that "
                                         f"leave data.root are refused: copy what it points to into data.root instead"]
    else:
        assert caught.value.problems == [f"{image}: not a regular file (a folder, FIFO or device), not an image"]


def _open_the_writing_end(fifo) -> None:
    import os

    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader: nothing is waiting on it
        pass


# ---------------------------------------------------------------- damaged stamps and reports


@pytest.mark.parametrize("content", ["[1, 2]", "null", '"done"', "\0" * 100, "{"],
                         ids=["list", "null", "string", "nul-filled", "cut short"])
def test_a_damaged_stamp_is_named_with_the_command_that_remakes_it(tmp_path, tiny_data, content):
    cfg = make_config(tmp_path, tiny_data, "folds.k=3")
    folds.run(cfg)
    stamp = folds_artifact(cfg, load_train(cfg)[0]).stamp_path
    stamp.write_text(content)
    with pytest.raises(ArtifactError, match=rf"stamp {stamp} is unreadable .*run: ./run.sh folds -c CONFIG --force"):
        folds.run(cfg)


@pytest.mark.parametrize("content", [b"\0" * 500, b"[]", b'{"members": {}}'], ids=["nul-filled", "list", "partial"])
def test_a_damaged_ensemble_report_is_named_by_summary(tmp_path, content):
    from pipeline.config import load_config
    from pipeline.stages import summary

    cfg = load_config("configs/demo.yaml", [f"output.dir={tmp_path}"])
    (tmp_path / "ensemble.json").write_bytes(content)
    with pytest.raises(ArtifactError, match=rf"{tmp_path / 'ensemble.json'} is unreadable .*re-run: ./run.sh ensemble"):
        summary.run(cfg)


# ---------------------------------------------------------------- what held: hints, code in configs and checkpoints


QUICK = ["folds.k=2", "model.backbones=[mobilenetv3_small_050]", "data.image_size=[32,40]", "train.epochs=1",
         "train.max_batches=1", "train.batch_size=8", "infer.tta=[none]"]


def test_ensemble_without_inference_tables_names_the_infer_stage(tmp_path, tiny_data):
    cfg = make_config(tmp_path, tiny_data, *QUICK)
    for stage in (folds, train, infer):
        stage.run(cfg)
    shutil.rmtree(tmp_path / "run" / "infer" / "mobilenetv3_small_050" / "fold1")
    with pytest.raises(ArtifactError) as caught:
        ensemble.run(cfg)
    message = str(caught.value)
    assert "infer tables mobilenetv3_small_050 fold 1: missing" in message
    assert "run: ./run.sh infer -c CONFIG model.backbones=[mobilenetv3_small_050] train.folds=[1]" in message
    assert "./run.sh train" not in message and "fold 0" not in message
    stamp = json.loads((tmp_path / "run" / "train" / "mobilenetv3_small_050" / "fold1" / "done.json").read_text())
    assert stamp["epochs_run"] == 1


def test_a_yaml_python_tag_is_refused_and_never_run(tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    marker = tmp_path / "yaml-ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"train:\n  epochs: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path "
                      f"['{marker}']]\n")
    with pytest.raises(ConfigError, match=rf"{config}: not valid YAML"):
        load_config(config)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("configs/demo.yaml", [f"train.epochs=!!python/object/apply:pathlib.Path.touch [{marker}]"])
    assert not marker.exists()


def test_a_checkpoint_holding_python_objects_is_refused_naming_it_and_never_run(tmp_path):
    import torch

    from pipeline.io import torch_load

    marker = tmp_path / "pickle-ran"
    path = tmp_path / "best.pt"
    torch.save({"model": {}, "extra": _Payload(marker)}, path)
    with pytest.raises(ArtifactError, match=rf"{path}: cannot load checkpoint"):
        torch_load(path)
    assert not marker.exists()
    path.write_bytes(b"\0" * 1000)
    with pytest.raises(ArtifactError, match=rf"{path}: cannot load checkpoint"):
        torch_load(path)
