"""infer stage: every (backbone, fold) best checkpoint predicts the eval images, and its own validation
images, with the configured TTA (pipeline.train.predict.infer_job), here or as Ray tasks (`runner.mode`).
Writes <output.dir>/infer/<backbone>/fold<k>/eval_probs.npz and val_probs_tta.npz; a folder made from the
current checkpoint, TTA and eval images is skipped."""
from __future__ import annotations

from pipeline.artifacts import job_list, require_all, train_artifact
from pipeline.data.dataset import load_infer_data
from pipeline.runner import run_jobs
from pipeline.stages import stage_main
from pipeline.train.model import check_tta
from pipeline.train.predict import infer_job


def run(cfg: dict, force: bool = False) -> list:
    for backbone in cfg["model"]["backbones"]:
        check_tta(cfg, backbone)  # a TTA list changed after training is refused before any image is decoded
    inputs = load_infer_data(cfg)  # eval images decoded once here into data.cache_dir, which every job reads
    jobs = job_list(cfg)
    # every checkpoint must be there before any work starts: name each one that is not
    require_all([train_artifact(cfg, b, f, inputs.train.fingerprint) for b, f in jobs],
                "fold checkpoints not usable, run the train stage first")
    return run_jobs(cfg, "infer", {f"{b} fold {f}": (b, f) for b, f in jobs}, infer_job, load_infer_data,
                    context=inputs, force=force)


if __name__ == "__main__":
    stage_main(run, "infer")
