"""What the Ray runner costs beyond the work itself: starting Ray, a job on a fresh worker process (it imports
the pipeline and torch: on GPUs every job gets a fresh worker), and a job on a warm worker. The jobs do
nothing, but go through pipeline.runner.run_jobs exactly as train's jobs do (data checks included).

    .venv/bin/python bench/ray_overhead.py -c configs/demo.yaml [--jobs 20] [key=value ...]

Needs the config's data, cache and folds file (the demo's exist after ./run.sh).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import runner  # noqa: E402
from pipeline.config import load_config  # noqa: E402


def nothing_to_prepare(cfg: dict) -> None:
    return None


def no_op(cfg: dict, number: int, context, force: bool = False) -> int:
    return number


def timed_jobs(cfg: dict, count: int) -> float:
    started = time.perf_counter()
    runner.run_jobs(cfg, "bench", {f"no-op {n}": (n,) for n in range(count)}, no_op, nothing_to_prepare)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="configs/demo.yaml")
    parser.add_argument("--jobs", type=int, default=20, help="no-op jobs on warm workers")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, ["runner.mode=ray", *args.overrides])
    started = time.perf_counter()
    runner.connect(cfg)
    startup = time.perf_counter() - started
    slots = runner.job_slots(cfg)
    cold = timed_jobs(cfg, slots)  # one job per slot, each on a worker process started for it
    warm = timed_jobs(cfg, args.jobs)
    print(f"Ray start-up (ray.init, a Ray on this machine): {startup:.2f} s")
    print(f"{slots} jobs at once on fresh workers: {cold:.2f} s (a job's start on a fresh worker process)")
    print(f"{args.jobs} jobs on {slots} warm workers: {warm:.2f} s, {warm * slots / args.jobs * 1000:.0f} ms a job")


if __name__ == "__main__":
    main()
