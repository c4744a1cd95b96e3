"""train stage: every (backbone, fold) job (pipeline.train.loop), one after another; finished jobs are skipped."""
from __future__ import annotations

from pipeline.artifacts import job_list
from pipeline.data.dataset import load_train_data
from pipeline.stages import stage_main
from pipeline.train.augment import check_augment
from pipeline.train.loop import train_job
from pipeline.train.model import check_backbones


def run(cfg: dict, force: bool = False) -> list[dict]:
    check_backbones(cfg)  # a misspelt second backbone fails now, not hours into the run
    check_augment(cfg)
    data = load_train_data(cfg)
    jobs = job_list(cfg)
    summaries = []
    for number, (backbone, fold) in enumerate(jobs, start=1):
        print(f"[train] job {number}/{len(jobs)}: {backbone} fold {fold}")
        summaries.append(train_job(cfg, backbone, fold, data, force=force))
    for s in summaries:
        print(f"  {s['backbone']:<32} fold {s['fold']}  best val F1 {s['best_f1']:.4f} at epoch {s['best_epoch']}")
    return summaries


if __name__ == "__main__":
    stage_main(run, "train")
