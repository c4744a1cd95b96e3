"""The `maskfold` command that `pip install -e .` installs (pyproject.toml -> pipeline/cli.py)."""
import os
import subprocess
import sys
import tomllib

import pytest

from pipeline.cli import main
from pipeline.io import PROJECT_ROOT
from pipeline.stages import STAGE_NAMES


def test_pyproject_installs_maskfold_with_requirements_txts_pins():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"maskfold": "pipeline.cli:main"}
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]


def test_maskfold_lists_every_stage_and_refuses_all_without_a_config(capsys):
    main(["--list"])
    listed = capsys.readouterr().out
    assert all(f"  {name}" in listed for name in STAGE_NAMES)
    with pytest.raises(SystemExit, match=r"usage: maskfold all -c CONFIG"):
        main(["all"])


def test_maskfold_runs_a_stage_as_run_sh_does(tiny_data, tmp_path):
    done = subprocess.run([sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())",
                           "folds", "-c", "configs/demo.yaml", f"data.root={tiny_data}", f"folds.dir={tmp_path}",
                           f"data.label_fixes={tiny_data / 'label_fixes.csv'}", "folds.k=3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,  # from elsewhere, as installed
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[folds] wrote" in done.stdout and list(tmp_path.glob("*-k3-seed42.csv"))
