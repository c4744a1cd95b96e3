"""The `maskfold` command (pyproject.toml: `pip install -e .`), which does what `./run.sh` does, with the Python it
was installed into instead of run.sh's .venv:

    maskfold                  the demo: every stage on generated data, then the summary (./run.sh)
    maskfold demo [k=v ...]   the same, with overrides
    maskfold all -c CFG       every stage on another config (real data: no generation, no held-out scoring)
    maskfold -c CFG [k=v ...] the same as all -c CFG; with configs/demo.yaml, the demo
    maskfold test [ARGS]      the tests (ARGS go to pytest)
    maskfold <stage> ARGS     one stage (maskfold --list lists them)

Like run.sh, it works in the project's folder (configs/, runs/ and folds/ are there), so it needs an editable
install of a checkout. run.sh keeps its own copy of the chain loop (bash, before any Python environment exists).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = "configs/demo.yaml"


def run_chain(config: str, demo: bool, overrides: list[str]) -> int:
    """Every stage of a full run as its own process, as run.sh's run_all does, then the summary with timings."""
    from pipeline.stages import chain

    with tempfile.NamedTemporaryFile("w", suffix=".timings", delete=False) as timings:
        for stage in chain(demo):
            print(f"==> {stage}", file=sys.stderr, flush=True)
            started = time.perf_counter()
            status = subprocess.call([sys.executable, "-m", f"pipeline.stages.{stage}", "-c", config, *overrides])
            if status:
                return status
            timings.write(f"{stage} {time.perf_counter() - started:.1f}\n")
            timings.flush()
    try:
        score = ["--score-heldout"] if demo else []
        return subprocess.call([sys.executable, "-m", "pipeline.stages.summary", "-c", config, "--timings",
                                timings.name, *score, *overrides])
    finally:
        os.unlink(timings.name)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    os.chdir(ROOT)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    command = args.pop(0) if args else "demo"
    if command == "demo":
        return run_chain(DEMO, True, args)
    if command in ("all", "-c", "--config"):
        if command == "all":
            if args[:1] not in (["-c"], ["--config"]) or len(args) < 2:
                sys.exit("usage: maskfold all -c CONFIG [key=value ...]")
            args.pop(0)
        if not args:
            sys.exit("usage: maskfold -c CONFIG [key=value ...]")
        config = args.pop(0)
        return run_chain(config, command != "all" and Path(config).name == Path(DEMO).name, args)
    if command == "test":
        import pytest

        return pytest.main(args)
    if command in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    from pipeline.__main__ import main as stage

    sys.argv = ["maskfold", command, *args]
    stage()
    return 0


if __name__ == "__main__":
    sys.exit(main())
