"""`python -m pipeline <stage> ARGS` runs one stage; `python -m pipeline --chain [demo|all]` lists a full run's stages."""
from __future__ import annotations

import runpy
import sys

from pipeline.stages import STAGE_NAMES, STAGES, chain


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--chain"]:
        print("\n".join(chain(demo=args[1:2] == ["demo"])))
        return
    usage = "usage: python -m pipeline <stage> [-c CONFIG] [--force] [key=value ...]\nstages:\n" + "\n".join(
        f"  {s.name:<10} {s.purpose}" for s in STAGES)
    if args[:1] == ["--list"]:
        print(usage)
        return
    if not args or args[0] not in STAGE_NAMES:
        sys.exit(f"unknown stage {args[0]!r}\n{usage}" if args else usage)
    sys.argv = [f"pipeline.stages.{args[0]}", *args[1:]]
    runpy.run_module(f"pipeline.stages.{args[0]}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
