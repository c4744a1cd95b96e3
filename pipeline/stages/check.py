"""check stage: validate the data and print a report. Every problem is listed, each naming its file or row."""
from __future__ import annotations

import os

import numpy as np

from pipeline import labels
from pipeline.artifacts import output_dir
from pipeline.data.eda import write_report
from pipeline.data.images import verify_images
from pipeline.data.layout import counts, load_eval, load_train
from pipeline.errors import DataError
from pipeline.io import atomic_write_json, git_commit
from pipeline.stages import stage_main


def run(cfg: dict, force: bool = False) -> dict:
    table, info = load_train(cfg, strict=False)
    problems = list(info["problems"])
    try:
        eval_table, eval_problems = load_eval(cfg, strict=False)
        problems.extend(eval_problems)
        eval_files = [f for f in eval_table["file"] if f]
    except DataError as error:
        problems.extend(error.problems)
        eval_table, eval_files = None, []
    # every listed name that is there, files or not (a FIFO or a folder named mask1.jpg is a problem too);
    # a missing eval image is already a problem of its info.csv row
    present = [f for f in info["image_files"] + eval_files if os.path.lexists(f)]
    problems.extend(verify_images(present, cfg["data"]["max_image_pixels"], cfg["data"]["num_workers"]))
    if problems:
        raise DataError(problems)

    report = counts(table, info["people"], cfg)
    report["eval_images"] = int(len(eval_table))
    report["label_fixes"] = info["fixes"]
    report["warnings"] = info["warnings"]
    report["data_root"] = cfg["data"]["root"]
    report["git_commit"] = git_commit()
    atomic_write_json(output_dir(cfg, "check", "report.json"), report)
    page = write_report(output_dir(cfg, "check"), info["people"], table, cfg, report, image_sizes(table["file"]))
    _print_report(report, cfg)
    print(f"plots and report: {page}")
    return report


def image_sizes(files) -> list[tuple[int, int]]:
    """(width, height) of each image from its header (Pillow reads no pixels)."""
    from PIL import Image

    sizes = []
    for file in files:
        with Image.open(file) as image:
            sizes.append(image.size)
    return sizes


def _print_report(report: dict, cfg: dict) -> None:
    print(f"data: {report['data_root']}")
    print(f"people {report['people']}  train images {report['images']}  eval images {report['eval_images']}")
    print("gender:", ", ".join(f"{k} {v}" for k, v in report["people_by_gender"].items()))
    print(f"age bands (old={cfg['data']['old_age']}):",
          ", ".join(f"{k} {v}" for k, v in report["people_by_age_band"].items()))
    print(f"training age bands (old={cfg['data']['train_old_age']}):",
          ", ".join(f"{k} {v}" for k, v in report["people_by_train_age_band"].items()))
    print("mask:", ", ".join(f"{k} {v}" for k, v in report["images_by_mask"].items()))
    counts = np.array([report["images_by_class"][c] for c in range(labels.NUM_CLASSES)])
    print("images per class:", " ".join(f"{c}:{n}" for c, n in enumerate(counts)))
    for line in report["warnings"]:
        print(f"warning: {line}")
    applied = [line for line in report["label_fixes"] if "skipped" not in line]
    print(f"label fixes applied: {len(applied)} of {len(report['label_fixes'])}")
    for line in applied:
        print(f"  {line}")


if __name__ == "__main__":
    stage_main(run, "check")
