"""The tree shows the architecture: stages only wire library code, and one list names the stages."""
import ast
import re
import subprocess
import sys
from pathlib import Path

from pipeline.io import PROJECT_ROOT
from pipeline.stages import STAGE_NAMES, chain

PIPELINE = PROJECT_ROOT / "pipeline"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_every_stage_in_the_list_has_a_module_and_every_module_is_listed():
    modules = {p.stem for p in (PIPELINE / "stages").glob("*.py") if p.stem != "__init__"}
    assert modules == set(STAGE_NAMES)


def test_no_stage_imports_another_stage():
    for path in (PIPELINE / "stages").glob("*.py"):
        others = {m for m in imported_modules(path)
                  if m.startswith("pipeline.stages.") and m.split(".")[2] in STAGE_NAMES}
        assert not others, f"{path.name} imports {others}"


def test_library_code_never_imports_a_stage():
    for path in PIPELINE.rglob("*.py"):
        if "stages" in path.parts or path.relative_to(PIPELINE).as_posix() in ("__main__.py", "cli.py"):  # entry points
            continue
        assert not {m for m in imported_modules(path) if m.startswith("pipeline.stages")}, path


def test_artifact_file_names_are_spelled_only_in_the_artifacts_module():
    names = re.compile(r"""["'](best\.pt|last\.pt|done\.json|eval_probs\.npz|val_probs(_tta)?\.npz|metrics\.jsonl)["']""")
    for path in PIPELINE.rglob("*.py"):
        if path.name != "artifacts.py":
            assert not names.search(path.read_text()), f"{path} spells an artifact file name"


def test_the_readme_stage_table_lists_exactly_the_stages():
    readme = (PROJECT_ROOT / "README.md").read_text()
    table = readme.split("| stage | reads | writes |", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert listed == list(STAGE_NAMES)


def test_run_sh_takes_its_chain_from_the_stage_list():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--chain", "demo"], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == chain(demo=True) == ["synth", "check", "faces", "folds", "train", "oof", "audit", "infer", "ensemble"]
    unknown = subprocess.run([sys.executable, "-m", "pipeline", "trian"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True)
    assert unknown.returncode != 0 and "unknown stage 'trian'" in unknown.stderr and "train" in unknown.stderr


def test_a_stage_prints_an_expected_error_in_one_line_and_keeps_tracebacks_for_bugs(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "pipeline.stages.check", "-c", "configs/demo.yaml",
                              f"data.root={tmp_path / 'nowhere'}"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "[check] error:" in missing.stderr and "train.csv: file not found" in missing.stderr

    bug = "import sys; from pipeline.stages import stage_main; sys.argv=['x']; " \
          "stage_main(lambda cfg, force: 1 / 0, 'check')"
    crashed = subprocess.run([sys.executable, "-c", bug], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert crashed.returncode != 0 and "Traceback" in crashed.stderr and "ZeroDivisionError" in crashed.stderr
