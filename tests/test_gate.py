"""At the door: the bundle (one ONNX graph + bundle.json), its torch-free runtime, and predict on photos,
folders, videos and camera-sized frames."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline import labels
from pipeline.artifacts import EVAL_PROBS, infer_artifact, train_artifact
from pipeline.data.dataset import eval_identity, train_fingerprint
from pipeline.data.images import cached_images
from pipeline.data.layout import load_eval, load_train
from pipeline.data.pixels import image_set
from pipeline.errors import ConfigError, DataError, MissingArtifactError, StaleArtifactError
from pipeline.evaluate.ensemble import combine
from pipeline.evaluate.tables import mean_of_folds
from pipeline.gate.runtime import BundleError, Gate, ImageError, decode
from pipeline.io import PROJECT_ROOT
from pipeline.stages import export, predict, pseudo
from tests.conftest import camera_frame, make_config

@pytest.fixture
def run(gate_run):
    return gate_run


def test_the_bundle_gives_the_torch_pipelines_probabilities_on_the_eval_images(run):
    cfg = run["cfg"]
    table, _ = load_train(cfg)
    eval_table, _ = load_eval(cfg)
    fingerprint, eval_key = train_fingerprint(cfg, table), eval_identity(cfg, eval_table)
    report = json.loads((run["tmp"] / "run" / "ensemble.json").read_text())
    members = []
    for backbone in cfg["model"]["backbones"]:
        paths = {f: infer_artifact(cfg, backbone, f, train_artifact(cfg, backbone, f, fingerprint).read_stamp()["token"],
                                   eval_key).path(EVAL_PROBS) for f in range(cfg["folds"]["k"])}
        members.append(mean_of_folds(paths, eval_table["ImageID"].to_numpy().astype(str), backbone))
    expected = combine(members, [report["weights"][b] for b in cfg["model"]["backbones"]], report["combine"])
    crops = cached_images(cfg, image_set(cfg, "eval", eval_table["file"]))
    got = Gate(run["bundle"]).classify(np.asarray(crops))
    for key in labels.TABLE_KEYS:
        assert np.abs(got[key] - expected[key]).max() < 1e-4, key
    assert (got["joint"].argmax(1) == expected["joint"].argmax(1)).all()


def test_predict_on_the_eval_folder_gives_the_submissions_classes(run):
    cfg = run["cfg"]
    rows = predict.run(cfg, input=str(run["tmp"] / "data" / "eval" / "images"))
    submission = pd.read_csv(run["tmp"] / "run" / "submission.csv")
    got = {row["source"]: row["class"] for row in rows}
    assert len(rows) == len(submission) and got == dict(zip(submission["ImageID"], submission["ans"]))
    written = pd.read_csv(run["tmp"] / "run" / "predict" / "predictions.csv")
    assert list(written["class"]) == [row["class"] for row in rows]


def test_predict_finds_and_judges_a_real_face_in_a_camera_frame(run, portrait, tmp_path):
    frame_file = tmp_path / "frame.jpg"
    cv2.imwrite(str(frame_file), camera_frame(portrait)[:, :, ::-1])
    rows = predict.run(run["cfg"], input=str(frame_file), faces="all", draw=True, out=str(tmp_path / "out"))
    assert len(rows) == 1
    row = rows[0]
    assert 400 < row["x0"] < row["x1"] < 400 + 512 * 0.8 and 100 < row["y0"] < row["y1"] < 100 + 600 * 0.8
    assert row["verdict"] in ("ok", "incorrect", "no_mask") and 0 <= row["class"] < 18
    annotated = cv2.imread(str(tmp_path / "out" / "annotated" / "frame.jpg"))
    assert annotated.shape == (720, 1280, 3)
    assert not np.array_equal(annotated, cv2.imread(str(frame_file)))  # the box and verdict are drawn


def test_predict_on_a_video_samples_frames_and_writes_json_lines(run, portrait, tmp_path):
    video = tmp_path / "door.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 360))
    for i in range(20):  # 2 s at 10 fps: the person walks in from the left
        writer.write(cv2.resize(camera_frame(portrait, x=100 + 20 * i), (640, 360))[:, :, ::-1])
    writer.release()
    rows = predict.run(run["cfg"], input=str(video), fps=2, out=str(tmp_path / "out"))
    lines = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == [0, 5, 10, 15]
    assert all(len(line["faces"]) == 1 for line in lines) and len(rows) == 4
    assert lines[-1]["faces"][0]["box"][0] > lines[0]["faces"][0]["box"][0]  # the box follows the face


def test_the_runtime_runs_with_torch_and_timm_unimportable(run, portrait, tmp_path):
    frame_file = tmp_path / "frame.png"
    cv2.imwrite(str(frame_file), camera_frame(portrait)[:, :, ::-1])
    code = ("import sys, json\n"
            "for name in ('torch', 'timm', 'torchvision', 'facenet_pytorch', 'albumentations', 'pandas'):\n"
            "    sys.modules[name] = None  # any import of them now raises ImportError\n"
            "from pipeline.gate.runtime import Gate, decode\n"
            f"gate = Gate({str(run['bundle'])!r})\n"
            f"faces = gate.predict(decode(open({str(frame_file)!r}, 'rb').read(), 10**8))\n"
            "print(json.dumps([f['verdict'] for f in faces]))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm') and sys.modules[m]))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    verdicts, modules = done.stdout.strip().splitlines()
    assert len(json.loads(verdicts)) == 1 and modules == "[]"


def test_a_second_export_of_the_same_run_writes_the_same_files(run):
    files = sorted(p for p in run["bundle"].rglob("*") if p.is_file() and p.name != "done.json")
    before = {p: p.read_bytes() for p in files}
    export.run(run["cfg"], force=True)
    assert sorted(p for p in run["bundle"].rglob("*") if p.is_file() and p.name != "done.json") == files
    assert all(p.read_bytes() == before[p] for p in files), [p.name for p in files if p.read_bytes() != before[p]]


@pytest.mark.parametrize("field, value", [("classes", ["worn", "not_worn"]), ("input.size", [64, 64]),
                                          ("heads", {"mask": ["mask", "no_mask"]})])
def test_a_bundle_made_for_other_classes_or_another_input_size_is_refused_naming_the_field(run, tmp_path, field, value):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(run["bundle"], copy)
    manifest = json.loads((copy / "bundle.json").read_text())
    node = manifest
    *parents, last = field.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=rf"field '{field}'"):
        Gate(copy)


def test_a_bundle_with_a_swapped_graph_is_refused_naming_the_file(run, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(run["bundle"], copy)
    shutil.copy(copy / "mtcnn" / "pnet.onnx", copy / "ensemble.onnx")
    with pytest.raises(BundleError, match="ensemble.onnx is not the file it was exported with"):
        Gate(copy)


def test_predict_without_a_bundle_names_the_export_stage(tmp_path):
    cfg = make_config(tmp_path, tmp_path / "data")
    with pytest.raises(MissingArtifactError, match=r"bundle.json not found; run: ./run.sh export"):
        predict.run(cfg, input=str(tmp_path))


@pytest.mark.parametrize("body, reason", [
    (b"", "empty body"), (b"hello, not an image", "not a JPEG or PNG"),
    ("truncated", "truncated JPEG"), ("bomb", "more than the gate takes")])
def test_untrusted_bytes_are_refused_with_a_one_line_reason(portrait, body, reason):
    jpeg = cv2.imencode(".jpg", portrait)[1].tobytes()
    if body == "truncated":
        body = jpeg[:len(jpeg) // 2]
    elif body == "bomb":
        import struct
        import zlib

        png = bytearray(cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes())
        png[16:24] = struct.pack(">II", 30000, 30000)
        png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
        body = bytes(png)
    with pytest.raises(ImageError, match=reason):
        decode(body, 16_777_216)
    assert decode(jpeg, 16_777_216).shape == portrait.shape


@pytest.mark.parametrize("mode", ["joint", "heads"])
def test_the_graph_votes_as_the_ensemble_stage_with_unequal_weights(mode):
    """EnsembleGraph against the pipeline's own path: predict (TTA) per model, then combine with weights."""
    import torch

    from pipeline.config import load_config
    from pipeline.gate.export import EnsembleGraph
    from pipeline.train.model import MaskNet
    from pipeline.train.predict import eval_normalize
    from pipeline.train.predict import predict as torch_predict

    cfg = load_config("configs/demo.yaml", ["data.image_size=[32,40]", "infer.tta=[none,hflip]"])
    torch.manual_seed(0)
    models = [MaskNet("mobilenetv3_small_050", head).eval() for head in ("multihead", "single")]
    crops = np.random.default_rng(0).integers(0, 255, (6, 40, 32, 3), dtype=np.uint8)
    graph = EnsembleGraph(cfg, [(models[0], 0.7), (models[1], 0.3)], mode).eval()
    with torch.no_grad():
        got = graph(torch.from_numpy(crops)).numpy()
    normalize = eval_normalize(cfg, torch.device("cpu"))
    tables = [torch_predict(m, crops, np.arange(6), normalize, 8, ["none", "hflip"]) for m in models]
    expected = combine(tables, [0.7, 0.3], mode)
    for key, (a, b) in {"mask": (0, 3), "gender": (3, 5), "age": (5, 8), "joint": (8, 26)}.items():
        np.testing.assert_allclose(got[:, a:b], expected[key], atol=1e-5)


def test_with_the_offsets_decision_rule_the_bundle_still_gives_the_submissions_classes(run, tmp_path):
    """ensemble.decision: offsets changes submission.csv; the bundle carries the offsets, so predict follows."""
    import shutil

    from pipeline.config import with_values
    from pipeline.stages import ensemble

    shutil.copytree(run["tmp"] / "run", tmp_path / "run")
    cfg = with_values(run["cfg"], {"output.dir": str(tmp_path / "run"), "ensemble.decision": "offsets"})
    report = ensemble.run(cfg)
    assert report["decision"]["rule"] == "offsets" and len(report["decision"]["offsets"]) == 18
    assert {"argmax_f1", "nested_f1", "fitted_on_all_f1"} <= set(report["decision"])
    export.run(cfg)
    manifest = json.loads((tmp_path / "run" / "bundle" / "bundle.json").read_text())
    assert manifest["decision"]["offsets"] == report["decision"]["offsets"] or \
        not any(report["decision"]["offsets"])  # all-zero offsets export as the plain argmax
    rows = predict.run(cfg, input=str(run["tmp"] / "data" / "eval" / "images"))
    submission = pd.read_csv(tmp_path / "run" / "submission.csv")
    assert {row["source"]: row["class"] for row in rows} == dict(zip(submission["ImageID"], submission["ans"]))


def test_gate_folds_puts_only_those_fold_models_in_the_bundle(run, tmp_path):
    """gate.folds: [1]: one model per backbone at the door (a student's run), voting as its fold's tables do."""
    import shutil

    from pipeline.config import with_values

    shutil.copytree(run["tmp"] / "run", tmp_path / "run")
    cfg = with_values(run["cfg"], {"output.dir": str(tmp_path / "run"), "gate.folds": [1]})
    folder = export.run(cfg)
    manifest = json.loads((folder / "bundle.json").read_text())
    assert [(m["backbone"], m["fold"]) for m in manifest["ensemble"]["members"]] == \
        [(b, 1) for b in cfg["model"]["backbones"]]
    table, _ = load_train(cfg)
    eval_table, _ = load_eval(cfg)
    fingerprint, eval_key = train_fingerprint(cfg, table), eval_identity(cfg, eval_table)
    members = [mean_of_folds({1: infer_artifact(cfg, b, 1, train_artifact(cfg, b, 1, fingerprint).read_stamp()["token"],
                                                eval_key).path(EVAL_PROBS)}, eval_table["ImageID"].to_numpy().astype(str), b)
               for b in cfg["model"]["backbones"]]
    expected = combine(members, [manifest["ensemble"]["backbone_weights"][b] for b in cfg["model"]["backbones"]],
                       manifest["ensemble"]["combine"])
    got = Gate(folder).classify(np.asarray(cached_images(cfg, image_set(cfg, "eval", eval_table["file"]))))
    assert np.abs(got["joint"] - expected["joint"]).max() < 1e-4


def _video(path, portrait, frames=20, fps=10):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (640, 360))
    for i in range(frames):
        writer.write(cv2.resize(camera_frame(portrait, x=100 + 20 * i), (640, 360))[:, :, ::-1])
    writer.release()
    return path


def test_predict_samples_at_the_rate_asked_and_a_rerun_replaces_its_outputs(run, portrait, tmp_path):
    video, out = _video(tmp_path / "door.avi", portrait), tmp_path / "out"
    for _ in range(2):  # the second run replaces the first's lines, never appends to them
        predict.run(run["cfg"], input=str(video), fps=4, out=str(out))
        lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert [line["frame"] for line in lines] == [0, 3, 5, 8, 10, 13, 15, 18]  # 4 a second of a 10 fps video
    record = json.loads((out / "predict.json").read_text())
    assert record["input"] == str(video) and record["frames_taken"] == 8 and record["fps"] == 4
    assert record["bundle"]["git_commit"] and sorted(p.name for p in out.iterdir()) == [
        "predict.json", "predictions.csv", "predictions.jsonl"]


def test_ctrl_c_ends_a_stream_with_its_table_written(run, portrait, tmp_path, monkeypatch):
    from pipeline.gate import runtime

    calls, predict_one = [], runtime.Gate.predict

    def interrupted(self, image, faces="all"):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return predict_one(self, image, faces)

    monkeypatch.setattr(runtime.Gate, "predict", interrupted)
    out = tmp_path / "out"
    rows = predict.run(run["cfg"], input=str(_video(tmp_path / "door.avi", portrait)), fps=10, out=str(out))
    assert len(rows) == 2 and len(pd.read_csv(out / "predictions.csv")) == 2
    assert json.loads((out / "predict.json").read_text())["interrupted"] is True


@pytest.mark.parametrize("fps", [0, -1, float("nan")])
def test_a_bad_fps_is_refused(run, fps):
    with pytest.raises(ConfigError, match=r"--fps"):
        predict.run(run["cfg"], input="0", fps=fps)


def test_predict_reads_only_regular_files_and_fails_when_none_could_be_read(run, portrait, tmp_path):
    folder, out = tmp_path / "photos", tmp_path / "out"
    folder.mkdir()
    os.mkfifo(folder / "a_fifo.jpg")  # a read would block forever
    (folder / "b_zero.jpg").symlink_to("/dev/zero")  # a read would never end
    with pytest.raises(DataError) as caught:
        predict.run(run["cfg"], input=str(folder), out=str(out))
    assert "a_fifo.jpg: not a regular file" in str(caught.value) and "b_zero.jpg: not a regular file" in str(caught.value)
    assert not out.exists() or not (out / "predictions.csv").exists()
    cv2.imwrite(str(folder / "c_photo.jpg"), camera_frame(portrait)[:, :, ::-1])
    rows = predict.run(run["cfg"], input=str(folder), faces="all", out=str(out))
    assert len(rows) == 1 and rows[0]["source"] == "c_photo.jpg"
    assert len(json.loads((out / "predict.json").read_text())["unreadable"]) == 2
    done = subprocess.run([sys.executable, "-m", "pipeline.stages.predict", "-c", "configs/demo.yaml",
                           f"output.dir={run['tmp'] / 'run'}", "--input", str(folder / "a_fifo.jpg"), "--out",
                           str(tmp_path / "cli")], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert done.returncode != 0 and "a_fifo.jpg: not a regular file" in done.stdout + done.stderr


@pytest.fixture
def run_copy(gate_run, tmp_path):
    """The finished tiny run copied into a folder this test may change (the bundle link and its versions too)."""
    from pipeline.config import with_values

    out = tmp_path / "run"
    shutil.copytree(gate_run["tmp"] / "run", out, symlinks=True)
    return with_values(gate_run["cfg"], {"output.dir": str(out)})


def _reinfer_fold0(cfg):
    """What a retrain and a re-infer of fold 0 leave: its eval table changed and stamped anew."""
    from pipeline.data.dataset import eval_identity
    from pipeline.evaluate.tables import fresh_infer_artifacts

    table, _ = load_train(cfg)
    info, _ = load_eval(cfg)
    artifact = fresh_infer_artifacts(cfg, "mobilenetv3_small_050", train_fingerprint(cfg, table),
                                     eval_identity(cfg, info))[0]
    arrays = dict(np.load(artifact.path(EVAL_PROBS)))
    arrays["probs_joint"] = arrays["probs_joint"][::-1].copy()
    np.savez(artifact.path(EVAL_PROBS), **arrays)
    artifact.seal(backbone="mobilenetv3_small_050", fold=0)


def test_export_refuses_an_ensemble_fitted_on_other_tables_and_ships_it_once_refitted(run_copy):
    from pipeline.stages import ensemble

    before = os.readlink(Path(run_copy["output"]["dir"]) / "bundle")
    _reinfer_fold0(run_copy)
    with pytest.raises(StaleArtifactError, match=r"ensemble .*stale.*infer\.mobilenetv3_small_050 fold 0.*"
                                                 r"run\.sh ensemble"):
        export.run(run_copy, force=True)
    with pytest.raises(StaleArtifactError, match=r"ensemble .*infer\.mobilenetv3_small_050 fold 0"):
        pseudo.run(run_copy)
    changed = {**run_copy, "ensemble": {**run_copy["ensemble"], "decision": "offsets"}}
    ensemble.run(run_copy)
    with pytest.raises(StaleArtifactError, match=r"ensemble\.decision"):  # the ensemble section is its identity too
        export.run(changed, force=True)
    assert os.readlink(Path(run_copy["output"]["dir"]) / "bundle") == before  # nothing was shipped meanwhile
    export.run(run_copy, force=True)
    assert os.readlink(Path(run_copy["output"]["dir"]) / "bundle") != before


def test_an_export_switches_the_bundle_whole_and_keeps_the_version_before(run_copy):
    out = Path(run_copy["output"]["dir"])
    first = Gate(out / "bundle")
    export.run(run_copy, force=True)
    second = (out / "bundle").resolve()
    assert (out / "bundle").is_symlink() and second != first.folder and first.folder.is_dir()
    assert first.classify(np.zeros((1, 40, 32, 3), np.uint8))["joint"].shape == (1, 18)  # the old one still loads
    export.run(run_copy, force=True)
    versions = sorted(p.name for p in out.glob("bundle-*"))
    assert len(versions) == 2 and not first.folder.exists() and second.is_dir()  # the one before stays, no more


def test_blazeface_finds_the_real_face_in_camera_frames_and_keeps_its_landmarks(portrait, tmp_path):
    from pipeline.data.blazeface import ANCHORS, BlazeFace, onnx_model

    assert ANCHORS.shape == (896, 2)
    finder = BlazeFace(onnx_model(tmp_path))  # converted here from the wheel's .tflite: no download
    for x, y, scale in ((400, 100, 0.8), (900, 300, 0.3)):  # the portrait's face about 190 and 70 px wide
        faces = finder.find(camera_frame(portrait, x=x, y=y, scale=scale), min_score=0.5)
        assert len(faces) == 1, (x, y, scale, faces)
        x0, y0, x1, y1 = faces[0].box
        assert x < x0 < x1 < x + 512 * scale and y < y0 < y1 < y + 600 * scale
        assert len(faces[0].landmarks) == 6 and all(x0 <= px <= x1 and y0 <= py <= y1
                                                    for px, py in faces[0].landmarks[:4])  # eyes, nose, mouth
    assert finder.find(np.zeros((720, 1280, 3), np.uint8), min_score=0.5) == []


def test_a_bundle_with_the_blazeface_finder_finds_and_judges_the_face(run_copy, portrait, tmp_path):
    from pipeline.config import with_values

    cfg = with_values(run_copy, {"faces.finder": "blazeface"})
    bundle = export.run(cfg, force=True)
    gate = Gate(bundle)
    assert gate.finder == "blazeface" and gate.manifest["faces"]["finder"] == "blazeface"
    faces = gate.predict(camera_frame(portrait))
    assert len(faces) == 1 and faces[0]["verdict"] in ("ok", "incorrect", "no_mask")
    from pipeline.data.faces import detect_faces  # the faces stage's call: the same finder on training photos

    (face,), = detect_faces([camera_frame(portrait)], cfg["faces"])
    assert face.box == tuple(gate.find_faces(camera_frame(portrait))[0].box) and len(face.landmarks) == 5
    assert face.landmarks[0][0] < face.landmarks[1][0]  # the image-left eye first, as MTCNN's
