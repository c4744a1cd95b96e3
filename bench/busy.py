"""The demo's training beside a competing CPU-bound process, for each CPU thread setting.

    python bench/busy.py [--settings a,b,...] [--competitors none,core,twin] [--repeats N] [--json FILE]

Measures one workload, the demo's train stage on fold 0 (both backbones, configs/demo.yaml, the data ./run.sh
generated), under each setting:
  spin       libgomp's default wait (GOMP_SPINCOUNT=300000: spin that long, then sleep), train.threads as configured
  passive    OMP_WAIT_POLICY=PASSIVE: an idle OpenMP thread sleeps at once
  active     OMP_WAIT_POLICY=ACTIVE: it never sleeps (the worst case, for comparison)
  spin1k, spin10k, spin100k
             GOMP_SPINCOUNT=1000, 10000, 100000: shorter spins before the sleep
  threads1   train.threads=1: no OpenMP team to wait for at all
  interop1   spin, plus torch.set_num_interop_threads(1)
  auto       what the project does (pipeline/openmp.py): PASSIVE if other processes keep half a core busy
             when a stage starts, else libgomp's default
and each competitor:
  none       nothing else runs (the quiet machine)
  core       a pure-Python loop on one core (a compile, a browser tab, another script)
  twin       the same workload with the same setting, started --twin-delay seconds later (default 3: two
             pipelines at once, the second started by hand while the first runs)
It prints wall seconds per cell (the median over --repeats; for twin, the mean of the two) and each busy
cell's slowdown against the same setting's quiet time. Run it on an otherwise quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path("/tmp/maskfold-busy")
SETTINGS = {
    "spin": ({"GOMP_SPINCOUNT": "300000"}, [], False),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, [], False),
    "active": ({"OMP_WAIT_POLICY": "ACTIVE"}, [], False),
    "spin1k": ({"GOMP_SPINCOUNT": "1000"}, [], False),
    "spin10k": ({"GOMP_SPINCOUNT": "10000"}, [], False),
    "spin100k": ({"GOMP_SPINCOUNT": "100000"}, [], False),
    "threads1": ({"GOMP_SPINCOUNT": "300000"}, ["train.threads=1"], False),
    "interop1": ({"GOMP_SPINCOUNT": "300000"}, [], True),
    "auto": ({}, [], False),
}
COMPETITORS = ("none", "core", "twin")
INTEROP = ("import runpy, sys, torch; torch.set_num_interop_threads(1); sys.argv[0] = 'train'; "
           "runpy.run_module('pipeline.stages.train', run_name='__main__')")


def command(setting: str, run: str) -> tuple[list[str], dict]:
    env_changes, overrides, interop = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MASKFOLD_OMP_WAIT")}
    env.update(env_changes, NO_ALBUMENTATIONS_UPDATE="1")
    args = ["-c", "configs/demo.yaml", "train.folds=[0]", f"output.dir={WORK / run}", *overrides]
    head = [sys.executable, "-c", INTEROP] if interop else [sys.executable, "-m", "pipeline.stages.train"]
    return head + args, env


def start(setting: str, run: str) -> subprocess.Popen:
    shutil.rmtree(WORK / run, ignore_errors=True)
    cmd, env = command(setting, run)
    log = open(WORK / f"{run}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, run: str, started: float) -> float:
    if process.wait() != 0:
        raise SystemExit(f"bench/busy.py: {run} failed (exit {process.returncode}); see {WORK / run}.log")
    return time.perf_counter() - started


def measure(setting: str, competitor: str, repeat: int, twin_delay: float = 3.0) -> float:
    run = f"{setting}-{competitor}-{repeat}"
    hog = None
    if competitor == "core":
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
    started = time.perf_counter()
    main = start(setting, run)
    twin = None
    if competitor == "twin":
        time.sleep(twin_delay)
        twin_started = time.perf_counter()
        twin = start(setting, run + "-twin")
    seconds = [finish(main, run, started)]
    if twin is not None:
        seconds.append(finish(twin, run + "-twin", twin_started))
    if hog is not None:
        hog.kill()
        hog.wait()
    return statistics.mean(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="spin,passive,threads1,auto")
    parser.add_argument("--competitors", default=",".join(COMPETITORS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--twin-delay", type=float, default=3.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    settings, competitors = args.settings.split(","), args.competitors.split(",")
    for name in settings:
        if name not in SETTINGS:
            raise SystemExit(f"bench/busy.py: unknown setting {name!r} ({', '.join(SETTINGS)})")
    WORK.mkdir(parents=True, exist_ok=True)
    print(f"[busy] warm-up (decode cache, imports): {settings[0]} alone", flush=True)
    measure(settings[0], "none", -1)
    times: dict[str, dict[str, list[float]]] = {s: {c: [] for c in competitors} for s in settings}
    for repeat in range(args.repeats):  # settings interleaved, so a drifting machine hits them all alike
        for competitor in competitors:
            for setting in settings:
                seconds = measure(setting, competitor, repeat, args.twin_delay)
                times[setting][competitor].append(seconds)
                print(f"[busy] {setting:<9} {competitor:<5} repeat {repeat}: {seconds:.1f} s", flush=True)
    cores = os.cpu_count()
    print(f"\nfold-0 training of configs/demo.yaml (both backbones), {cores} cores, wall seconds "
          f"(median of {args.repeats}); x = slowdown against the same setting alone")
    header = "| setting | " + " | ".join(competitors) + " |"
    print(header + "\n|---|" + "---:|" * len(competitors))
    for setting in settings:
        quiet = statistics.median(times[setting]["none"]) if "none" in competitors else None
        cells = []
        for competitor in competitors:
            value = statistics.median(times[setting][competitor])
            ratio = f" ({value / quiet:.2f}x)" if quiet and competitor != "none" else ""
            cells.append(f"{value:.1f}{ratio}")
        print(f"| {setting} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "repeats": args.repeats, "seconds": times}, indent=1))


if __name__ == "__main__":
    main()
