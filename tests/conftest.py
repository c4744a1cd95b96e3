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
