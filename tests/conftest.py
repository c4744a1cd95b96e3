"""Shared fixtures: tiny generated datasets and configs pointing every output into tmp folders."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipeline.config import load_config  # noqa: E402

REAL_META = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_meta"


def make_config(tmp: Path, data_root: Path, *overrides: str) -> dict:
    """demo.yaml with data, outputs, folds and cache under tmp, plus overrides."""
    return load_config("configs/demo.yaml", [
        f"data.root={data_root}", f"synth.out={data_root}", f"output.dir={tmp / 'run'}", f"folds.dir={tmp / 'folds'}",
        f"data.cache_dir={tmp / 'cache'}", f"data.label_fixes={data_root / 'label_fixes.csv'}",
        "data.num_workers=1", "synth.workers=1", *overrides])


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic dataset in the competition layout, generated once per test session."""
    from pipeline.stages import synth

    root = tmp_path_factory.mktemp("tiny") / "data"
    cfg = make_config(root.parent, root, "synth.people=12", "synth.eval_people=3", "synth.image_size=[96,128]")
    synth.run(cfg)
    return root


@pytest.fixture
def data_copy(tiny_data, tmp_path) -> Path:
    """A private copy of the tiny dataset that a test may break."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    return root


@pytest.fixture(autouse=True)
def _run_in_project_root(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])


GATE_RUN = ["synth.people=24", "synth.eval_people=4", "synth.image_size=[96,128]", "data.image_size=[32,40]",
            "folds.k=2", "model.backbones=[mobilenetv3_small_050,regnetx_002]", "train.epochs=2",
            "train.batch_size=16", "infer.tta=[none,hflip]", "ensemble.weight_step=0.25"]


@pytest.fixture(scope="session")
def gate_run(tmp_path_factory) -> dict:
    """A tiny finished run (2 backbones x 2 folds) and its exported bundle, made once per test session."""
    from pipeline.stages import ensemble, export, folds, infer, oof, synth, train

    tmp = tmp_path_factory.mktemp("gate")
    cfg = make_config(tmp, tmp / "data", *GATE_RUN)
    for stage in (synth, folds, train, oof, infer, ensemble):
        stage.run(cfg)
    return {"cfg": cfg, "tmp": tmp, "bundle": export.run(cfg)}


@pytest.fixture(scope="session")
def portrait():
    """Grace Hopper's portrait (512x600, RGB), a real photograph that matplotlib ships."""
    import cv2
    from matplotlib import cbook

    return cv2.cvtColor(cv2.imread(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))), cv2.COLOR_BGR2RGB)


def camera_frame(portrait, x: int = 400, y: int = 100, scale: float = 0.8):
    """A 1280x720 camera frame with the portrait at (x, y), scaled."""
    import cv2
    import numpy as np

    frame = np.full((720, 1280, 3), 90, np.uint8)
    small = cv2.resize(portrait, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    frame[y:y + small.shape[0], x:x + small.shape[1]] = small
    return frame


def wait_for_server(url: str, seconds: float = 90) -> bool:
    """Whether a server at `url` answered GET /health (any status) within `seconds`; polls every 0.2 s."""
    import time

    import httpx

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=1)
            return True
        except httpx.HTTPError:
            time.sleep(0.2)
    return False
