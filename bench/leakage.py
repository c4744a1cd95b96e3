"""How leaky is an image-level split? Train fold 0 of the first backbone twice on the same data:
once with folds drawn over images (a person's 7 images spread over folds) and once with the
person-grouped folds, then print both validation macro F1s.

    .venv/bin/python bench/leakage.py -c configs/demo.yaml [key=value ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import load_config  # noqa: E402
from pipeline.data.dataset import load_train_data  # noqa: E402
from pipeline.train.loop import train_job  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-c", "--config", default="configs/demo.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results = {}
    for split in ("image", "person"):
        cfg = load_config(args.config, [*args.overrides, f"output.dir=runs/bench_leakage/{split}"])
        data = load_train_data(cfg)
        if split == "image":
            rng = np.random.default_rng(cfg["folds"]["seed"])
            image_folds = rng.permutation(np.arange(len(data.fold)) % cfg["folds"]["k"])
            data = dataclasses.replace(data, fold=image_folds)
        started = time.time()
        summary = train_job(cfg, cfg["model"]["backbones"][0], 0, data, force=True)
        results[split] = (summary["best_f1"], summary["best_epoch"], time.time() - started)
    backbone = cfg["model"]["backbones"][0]
    print(f"\nleakage check, {backbone}, fold 0 of {cfg['folds']['k']}, data {cfg['data']['root']}")
    for split, (f1, epoch, seconds) in results.items():
        print(f"  {split:>6}-level split: best val macro F1 {f1:.4f} (epoch {epoch}, {seconds:.0f}s)")
    print(f"  gap (image - person): {results['image'][0] - results['person'][0]:+.4f}")


if __name__ == "__main__":
    main()
