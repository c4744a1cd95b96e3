"""The two checkpoints of a training job: best.pt (weights at the best validation F1: the EMA weights when
train.ema_decay is on) and last.pt (everything a killed job needs to continue bit-identically).
Loaded with weights_only=True."""
from __future__ import annotations

import torch

from pipeline.artifacts import BEST, LAST, Artifact
from pipeline.io import atomic_torch_save, torch_load


def save_best(job: Artifact, model, backbone: str, fold: int, epoch: int, val_f1: float) -> None:
    atomic_torch_save(job.path(BEST), {"model": model.state_dict(), "backbone": backbone, "head": model.head_kind,
                                       "epoch": epoch, "val_f1": val_f1, "job_key": job.key, "fold": fold})


def save_last(artifact: Artifact, job, state: dict) -> None:
    """`job`: a pipeline.train.loop.Job (model, ema, optimizer, schedule)."""
    atomic_torch_save(artifact.path(LAST), {
        "model": job.model.state_dict(), "ema": job.ema.state_dict() if job.ema is not None else None,
        "optimizer": job.optimizer.state_dict(), "schedule": job.schedule.state_dict(), "state": state,
        "scaler": job.scaler.state_dict() if job.scaler is not None else None,  # fp16's loss scale
        "torch_rng": torch.get_rng_state(), "job_key": artifact.key})


def resume(artifact: Artifact, job) -> dict | None:
    """Load last.pt into the job's model, EMA, optimizer and schedule; returns its loop state, or None to
    start fresh. A last.pt started from other inputs is refused, never resumed silently."""
    path = artifact.path(LAST)
    if not path.exists():
        return None
    checkpoint = torch_load(path)
    artifact.refuse_other_inputs(checkpoint.get("job_key"), path)
    job.model.load_state_dict(checkpoint["model"])
    if job.ema is not None:
        job.ema.load_state_dict(checkpoint["ema"])
    job.optimizer.load_state_dict(checkpoint["optimizer"])
    job.schedule.load_state_dict(checkpoint["schedule"])
    if job.scaler is not None and checkpoint.get("scaler"):
        job.scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["torch_rng"])
    return checkpoint["state"]
