"""The two checkpoints of a training job: best.pt (weights at the best validation F1) and last.pt
(everything a killed job needs to continue bit-identically). Loaded with weights_only=True."""
from __future__ import annotations

import torch

from pipeline.artifacts import BEST, LAST, Artifact
from pipeline.io import atomic_torch_save, torch_load


def save_best(job: Artifact, model, backbone: str, fold: int, epoch: int, val_f1: float) -> None:
    atomic_torch_save(job.path(BEST), {"model": model.state_dict(), "backbone": backbone, "head": model.head_kind,
                                       "epoch": epoch, "val_f1": val_f1, "job_key": job.key, "fold": fold})


def save_last(job: Artifact, model, optimizer, scheduler, state: dict) -> None:
    atomic_torch_save(job.path(LAST), {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "state": state,
                                       "torch_rng": torch.get_rng_state(), "job_key": job.key})


def resume(job: Artifact, model, optimizer, scheduler) -> dict | None:
    """Load last.pt into model, optimizer and scheduler; returns its loop state, or None to start fresh.

    A last.pt started from other inputs is refused, never resumed silently.
    """
    path = job.path(LAST)
    if not path.exists():
        return None
    checkpoint = torch_load(path)
    job.refuse_other_inputs(checkpoint.get("job_key"), path)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["torch_rng"])
    return checkpoint["state"]
