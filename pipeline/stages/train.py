"""train stage: every (backbone, fold) job (pipeline.train.loop), here one after another or as Ray tasks
(pipeline.runner, `runner.mode`); finished jobs are skipped."""
from __future__ import annotations

from pipeline.artifacts import job_list
from pipeline.data.dataset import load_train_data
from pipeline.runner import run_jobs
from pipeline.stages import stage_main
from pipeline.train.augment import check_augment
from pipeline.train.loop import train_job
from pipeline.train.model import check_backbones


def run(cfg: dict, force: bool = False) -> list[dict]:
    check_backbones(cfg)  # a misspelt second backbone fails now, not hours into the run
    check_augment(cfg)
    data = load_train_data(cfg)  # decoded once here into data.cache_dir, which every job then reads
    jobs = {f"{backbone} fold {fold}": (backbone, fold) for backbone, fold in job_list(cfg)}
    summaries = run_jobs(cfg, "train", jobs, train_job, load_train_data, context=data, force=force)
    for s in summaries:
        print(f"  {s['backbone']:<32} fold {s['fold']}  best val F1 {s['best_f1']:.4f} at epoch {s['best_epoch']}")
    return summaries


if __name__ == "__main__":
    stage_main(run, "train")
