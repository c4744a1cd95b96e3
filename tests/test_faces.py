"""The face finder (MTCNN) on a real photograph, the crop rule around a face, the faces stage, and pixels in
every identity: a replaced image or a changed margin makes the jobs made from the old pixels stale."""
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
from matplotlib import cbook

from pipeline.artifacts import BOXES, faces_artifact, train_artifact
from pipeline.data.crop import crop_box, crop_rule, face_crop_box
from pipeline.data.faces import choose_faces, detect_faces, read_boxes
from pipeline.data.layout import load_eval, load_train
from pipeline.data.pixels import pixel_key
from pipeline.errors import MissingArtifactError, StaleArtifactError
from pipeline.stages import ensemble, faces, folds, infer, oof, train
from tests.conftest import make_config

FRAME_W, FRAME_H = 1280, 720
FAST = ["data.image_size=[32,40]", "folds.k=3", "model.backbones=[mobilenetv3_small_050]", "train.folds=[0]",
        "train.epochs=1", "train.max_batches=1", "train.batch_size=16", "augment.train=[{name: HorizontalFlip, p: 0.5}]",
        "infer.tta=[none]"]


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    """Grace Hopper's portrait (512x600, RGB), a real photograph that matplotlib ships."""
    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def faces_cfg() -> dict:
    return make_config(__import__("pathlib").Path("/tmp"), __import__("pathlib").Path("/tmp"))["faces"]


@pytest.fixture(scope="module")
def reference_box(portrait, faces_cfg):
    found = detect_faces([portrait], {**faces_cfg, "detect_scale": 1.0})[0]
    assert len(found) == 1, "the portrait alone, at full resolution, shows one face"
    return np.array(found[0].box)


def _frame(portrait, scale: float, x: int, y: int, base=None) -> np.ndarray:
    frame = base if base is not None else np.full((FRAME_H, FRAME_W, 3), 90, np.uint8)
    small = cv2.resize(portrait, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    frame[y:y + small.shape[0], x:x + small.shape[1]] = small
    return frame


# Tolerance: each edge of the box found in the frame lies within 12 % of the face's width of where the
# portrait's own box (found alone at full resolution) lands after scaling and moving it.
@pytest.mark.parametrize("scale", [0.5, 1.0])
@pytest.mark.parametrize("where", ["top-left", "centre", "bottom-right"])
def test_a_real_face_anywhere_in_a_camera_frame_gets_a_box_around_it(portrait, faces_cfg, reference_box, scale, where):
    width, height = round(portrait.shape[1] * scale), round(portrait.shape[0] * scale)
    x, y = {"top-left": (10, 10), "centre": ((FRAME_W - width) // 2, (FRAME_H - height) // 2),
            "bottom-right": (FRAME_W - width - 10, FRAME_H - height - 10)}[where]
    found = detect_faces([_frame(portrait, scale, x, y)], faces_cfg)[0]
    assert len(found) == 1
    expected = reference_box * scale + np.array([x, y, x, y])
    tolerance = 0.12 * (expected[2] - expected[0])
    assert np.abs(np.array(found[0].box) - expected).max() <= tolerance, (found[0].box, expected)
    assert found[0].score >= faces_cfg["min_score"] and len(found[0].landmarks) == 5


def test_two_faces_give_two_boxes(portrait, faces_cfg):
    frame = _frame(portrait, 0.5, 100, 200)
    frame = _frame(portrait, 0.7, 800, 150, base=frame)
    found = detect_faces([frame], faces_cfg)[0]
    assert len(found) == 2
    lefts = sorted(face.box[0] for face in found)
    assert lefts[0] < 400 < 800 < lefts[1]


def test_a_frame_without_a_face_gives_no_box(faces_cfg):
    rng = np.random.default_rng(0)
    assert detect_faces([rng.integers(0, 255, (FRAME_H, FRAME_W, 3), dtype=np.uint8)], faces_cfg) == [[]]
    assert detect_faces([np.full((512, 384, 3), 200, np.uint8)], faces_cfg) == [[]]


# ---------------------------------------------------------------- which face crops a training photo

def _boxes(rows):
    """A detect_files-like table: (file, box or None)."""
    out = []
    for file, box in rows:
        x0, y0, x1, y1 = box if box else (np.nan,) * 4
        out.append({"file": file, "width": 384, "height": 512, "face": 0 if box else -1, "x0": x0, "y0": y0,
                    "x1": x1, "y1": y1, "score": 0.99 if box else np.nan, "source": "detector" if box else "fallback",
                    "chosen": False})
    return pd.DataFrame(out)


PEOPLE = pd.DataFrame({"file": ["a/normal", "a/mask1", "a/mask2"], "person_id": ["a"] * 3,
                       "stem": ["normal", "mask1", "mask2"]})
NORMAL, OWN = (100, 120, 280, 330), (110, 130, 270, 320)


@pytest.mark.parametrize("person_box, expected", [
    ("own", {"a/normal": ("detector", NORMAL), "a/mask1": ("detector", OWN), "a/mask2": ("fallback", None)}),
    ("fill", {"a/normal": ("detector", NORMAL), "a/mask1": ("detector", OWN), "a/mask2": ("normal", NORMAL)}),
    ("normal", {"a/normal": ("detector", NORMAL), "a/mask1": ("normal", NORMAL), "a/mask2": ("normal", NORMAL)}),
])
def test_the_person_option_reuses_the_unmasked_photos_box(person_box, expected):
    found = _boxes([("a/normal", NORMAL), ("a/mask1", OWN), ("a/mask2", None)])
    chosen = choose_faces(found, [0.1, 0.05, 0.9, 0.85], person_box, PEOPLE)
    picked = chosen[chosen["chosen"]].set_index("file")
    assert sorted(picked.index) == sorted(expected) and len(picked) == 3  # one chosen row per image
    for file, (source, box) in expected.items():
        assert picked.at[file, "source"] == source
        if box is not None:
            assert tuple(picked.loc[file, ["x0", "y0", "x1", "y1"]]) == box
        else:  # the fallback carries the fixed box in pixels
            assert tuple(picked.loc[file, ["x0", "y0", "x1", "y1"]]) == (38.0, 26.0, 346.0, 435.0)


def test_of_several_faces_training_takes_the_largest():
    found = pd.concat([_boxes([("a/normal", (10, 10, 60, 70))]), _boxes([("a/normal", NORMAL)])], ignore_index=True)
    picked = choose_faces(found, [0.1, 0.05, 0.9, 0.85], "own", PEOPLE.iloc[:1])
    assert tuple(picked[picked["chosen"]].iloc[0][["x0", "y0", "x1", "y1"]]) == NORMAL
    assert len(picked) == 2  # both faces stay in the table


def test_margins_keep_the_chin_and_the_crop_has_the_inputs_aspect():
    face, margin, size = (100.0, 100.0, 200.0, 220.0), [0.15, 0.2, 0.15, 0.35], [48, 64]
    x0, y0, x1, y1 = face_crop_box(face, 384, 512, margin, size)
    assert y1 >= face[3] + margin[3] * (face[3] - face[1]) - 1  # the lower edge is below the face's by the margin
    assert y0 <= face[1] - margin[1] * (face[3] - face[1]) + 1
    assert x0 <= face[0] - margin[0] * 100 + 1 and x1 >= face[2] + margin[2] * 100 - 1
    assert abs((x1 - x0) / (y1 - y0) - size[0] / size[1]) < 0.02


def test_a_crop_at_the_image_edge_moves_inside_and_a_huge_one_is_clipped():
    box = face_crop_box((0.0, 400.0, 120.0, 512.0), 384, 512, [0.15, 0.2, 0.15, 0.35], [48, 64])
    assert box[0] == 0 and box[3] == 512 and box[2] > 120
    assert face_crop_box((-50.0, -50.0, 500.0, 700.0), 384, 512, [0.5] * 4, [48, 64]) == (0, 0, 384, 512)


def test_the_fixed_box_mode_ignores_faces_and_margins():
    cfg = make_config(__import__("pathlib").Path("/tmp"), __import__("pathlib").Path("/tmp"))
    rule = crop_rule(cfg)
    assert "margin" not in rule and crop_box(192, 256, rule, face=(1, 2, 3, 4)) == (19, 13, 173, 218)


# ---------------------------------------------------------------- the faces stage on a dataset with real photos

@pytest.fixture
def detect_data(tmp_path, data_copy, portrait):
    """The tiny dataset with person 1's unmasked photo the real portrait and mask1 a blank wall (no face)."""
    table, _ = load_train(make_config(tmp_path, data_copy))
    person = table["person_id"].iloc[0]
    files = table[table["person_id"] == person].set_index("stem")["file"]
    height, width = cv2.imread(files["normal"]).shape[:2]
    cv2.imwrite(files["normal"], cv2.cvtColor(cv2.resize(portrait, (width, height)), cv2.COLOR_RGB2BGR))
    cv2.imwrite(files["mask1"], np.full((height, width, 3), 200, np.uint8))
    return data_copy, files


def test_the_faces_stage_writes_boxes_and_a_contact_sheet_and_counts_fallbacks(tmp_path, detect_data, capsys):
    data, files = detect_data
    cfg = make_config(tmp_path, data, "data.crop.mode=detect", "faces.person_box=own")
    reports = faces.run(cfg)
    table, _ = load_train(cfg)
    artifact = faces_artifact(cfg, "train", pixel_key(cfg, table["file"]))
    boxes = read_boxes(artifact.path(BOXES), data)
    chosen = boxes[boxes["chosen"]].set_index("file")
    assert set(chosen.index) == set(table["file"]) and len(chosen) == len(table)
    assert chosen.at[files["normal"], "source"] == "detector"
    assert chosen.at[files["mask1"], "source"] == "fallback"
    fallbacks = table[table["file"].isin(chosen.index[chosen["source"] == "fallback"])]
    by_mask = reports["train"]["fallbacks_by_mask"]
    assert sum(by_mask.values()) == len(fallbacks) and by_mask["worn"] == int((fallbacks["mask"] == 0).sum()) >= 1
    assert "fallback" in capsys.readouterr().out
    sheet = cv2.imread(str(artifact.path("contact_sheet.png")))
    assert sheet is not None and sheet.shape[0] > 128 and "contact_sheet.png" in artifact.path("report.md").read_text()
    header = artifact.path(BOXES).read_text().splitlines()[0].split(",")
    assert header[:9] == ["file", "width", "height", "face", "x0", "y0", "x1", "y1", "score"] and "nose_x" in header
    assert not any(row.startswith("/") for row in artifact.path(BOXES).read_text().splitlines())  # relative files
    assert faces_artifact(cfg, "eval", pixel_key(cfg, load_eval(cfg)[0]["file"])).is_fresh()


def test_fill_crops_a_faceless_photo_by_the_persons_unmasked_face(tmp_path, detect_data):
    data, files = detect_data
    cfg = make_config(tmp_path, data, "data.crop.mode=detect", "faces.person_box=fill")
    faces.run(cfg)
    table, _ = load_train(cfg)
    boxes = read_boxes(faces_artifact(cfg, "train", pixel_key(cfg, table["file"])).path(BOXES), data)
    chosen = boxes[boxes["chosen"]].set_index("file")
    assert chosen.at[files["mask1"], "source"] == "normal"
    columns = ["x0", "y0", "x1", "y1"]
    assert (chosen.loc[files["mask1"], columns] == chosen.loc[files["normal"], columns]).all()


def test_training_by_detection_needs_the_faces_stage_first(tmp_path, data_copy):
    cfg = make_config(tmp_path, data_copy, *FAST, "data.crop.mode=detect")
    folds.run(cfg)
    with pytest.raises(MissingArtifactError, match=r"faces table \(train images\): missing.*run: ./run.sh faces"):
        train.run(cfg)


# ---------------------------------------------------------------- pixels in every identity

def _replace_in_place(file, seed: int) -> None:
    """Other pixels under the same name, size-stable enough to keep the old mtime (as cp -p would)."""
    import os

    stat = os.stat(file)
    image = cv2.imread(str(file))
    image = np.random.default_rng(seed).integers(0, 255, image.shape, dtype=np.uint8)
    cv2.imwrite(str(file), image)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_training_image_replaced_in_place_makes_train_refuse_the_old_job_naming_the_file(tmp_path, data_copy):
    cfg = make_config(tmp_path, data_copy, *FAST)
    folds.run(cfg)
    train.run(cfg)
    replaced = load_train(cfg)[0]["file"].iloc[3]
    _replace_in_place(replaced, 1)
    name = replaced.split(str(data_copy) + "/")[1]
    with pytest.raises(StaleArtifactError, match=rf"data_fingerprint.pixels .*images: {name} changed"):
        train.run(cfg)
    assert all(s["epochs_run"] == 1 for s in train.run(cfg, force=True))
    assert train_artifact(cfg, "mobilenetv3_small_050", 0, _fingerprint(cfg)).is_fresh()


def _fingerprint(cfg):
    from pipeline.data.dataset import train_fingerprint

    return train_fingerprint(cfg, load_train(cfg)[0])


def test_a_copy_of_the_data_elsewhere_keeps_every_job_fresh(tmp_path, data_copy):
    cfg = make_config(tmp_path, data_copy, *FAST)
    folds.run(cfg)
    train.run(cfg)
    moved = tmp_path / "moved"
    shutil.copytree(data_copy, moved)
    moved_cfg = make_config(tmp_path, moved, *FAST)
    assert train_artifact(moved_cfg, "mobilenetv3_small_050", 0, _fingerprint(moved_cfg)).is_fresh()


def test_a_changed_margin_makes_detected_jobs_stale_and_force_retrains(tmp_path, detect_data):
    data, _ = detect_data
    cfg = make_config(tmp_path, data, *FAST, "data.crop.mode=detect")
    faces.run(cfg)
    folds.run(cfg)
    train.run(cfg)
    wider = make_config(tmp_path, data, *FAST, "data.crop.mode=detect", "data.crop.margin=[0.3,0.3,0.3,0.5]")
    with pytest.raises(StaleArtifactError, match=r"data.crop.margin \[0.15, 0.2, 0.15, 0.35\] -> \[0.3, 0.3, 0.3, 0.5\]"):
        train.run(wider)
    assert all(s["epochs_run"] == 1 for s in train.run(wider, force=True))
    stricter = make_config(tmp_path, data, *FAST, "data.crop.mode=detect", "faces.min_score=0.99")
    with pytest.raises(MissingArtifactError, match="run: ./run.sh faces"):  # other settings: another boxes table
        train.run(stricter)
    faces.run(stricter)
    with pytest.raises(StaleArtifactError, match=r"faces.min_score 0.95 -> 0.99"):
        train.run(stricter)


def test_an_eval_image_replaced_in_place_makes_infer_stale_and_the_ensemble_refuse(tmp_path, data_copy, capsys):
    cfg = make_config(tmp_path, data_copy, *FAST, "train.folds=null")
    folds.run(cfg)
    train.run(cfg)
    oof.run(cfg)
    infer.run(cfg)
    ensemble.run(cfg)
    eval_file = load_eval(cfg)[0]["file"].iloc[1]
    _replace_in_place(eval_file, 2)
    name = eval_file.split(str(data_copy) + "/")[1]
    with pytest.raises(StaleArtifactError, match=rf"infer tables .*stale.*eval_images.pixels.*images: {name} changed"):
        ensemble.run(cfg)
    capsys.readouterr()
    infer.run(cfg)
    assert "skipping" not in capsys.readouterr().out  # every fold predicted the new pixels again
    ensemble.run(cfg)


def test_the_onnx_mtcnn_finds_exactly_the_faces_facenet_pytorch_finds(portrait, faces_cfg, tmp_path):
    """One detector everywhere: pipeline/data/mtcnn.py (onnxruntime, no torch) against facenet-pytorch's
    MTCNN.detect on the portrait, a two-face frame and a faceless one, to a thousandth of a pixel."""
    import torch
    from facenet_pytorch import MTCNN

    from pipeline.data.mtcnn import Detector, export_nets

    nets = export_nets(tmp_path / "nets")
    reference = MTCNN(keep_all=True, min_face_size=20, post_process=False)
    ours = Detector(nets, 20)
    two = _frame(portrait, 0.7, 800, 150, base=_frame(portrait, 0.5, 100, 200))
    blank = np.full((300, 400, 3), 128, np.uint8)
    torch.set_num_threads(1)
    for image in (portrait, two, blank):
        boxes, scores, points = ours.detect(image)
        ref_boxes, ref_scores, ref_points = reference.detect(image, landmarks=True)
        if ref_boxes is not None:
            ref_boxes, ref_scores, ref_points = (np.asarray(a, np.float64) for a in (ref_boxes, ref_scores, ref_points))
        if ref_boxes is None:
            assert len(boxes) == 0
            continue
        assert len(boxes) == len(ref_boxes) >= 1
        order, ref_order = np.argsort(boxes[:, 0]), np.argsort(ref_boxes[:, 0])
        np.testing.assert_allclose(boxes[order], ref_boxes[ref_order], atol=1e-3)
        np.testing.assert_allclose(scores[order], ref_scores[ref_order], atol=1e-5)
        np.testing.assert_allclose(points[order], ref_points[ref_order], atol=1e-3)
    assert export_nets(tmp_path / "nets") == nets  # kept, not exported again
    again = export_nets(tmp_path / "again")
    assert all(again[n].read_bytes() == nets[n].read_bytes() for n in nets)  # the export is deterministic
