"""Losses from config: ce, focal, smooth (label smoothing) and f1 (soft macro F1), with optional class weights."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

LOSSES = ("ce", "focal", "smooth", "f1")


def class_weights(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse frequency, normalised to mean 1; classes absent from training get weight 1."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 1.0)
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def loss_fn(name: str, weight: torch.Tensor | None, label_smoothing: float, focal_gamma: float):
    if name not in LOSSES:
        raise ValueError(f"train.loss {name!r} is not one of {', '.join(LOSSES)}")

    on_device: dict = {}  # the weights copied to a device once, not at every step (a blocking copy on CUDA)

    def compute(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        w = None
        if weight is not None:
            if logits.device not in on_device:
                on_device[logits.device] = weight.to(logits.device)
            w = on_device[logits.device]
        if name == "ce":
            return F.cross_entropy(logits, target, weight=w)
        if name == "smooth":
            return F.cross_entropy(logits, target, weight=w, label_smoothing=label_smoothing)
        if name == "focal":
            log_p = F.log_softmax(logits, dim=1)
            log_pt = log_p.gather(1, target[:, None]).squeeze(1)
            focal = (1 - log_pt.exp()) ** focal_gamma * -log_pt
            if w is not None:
                return (focal * w[target]).sum() / w[target].sum()
            return focal.mean()
        # soft macro F1 over the batch: differentiable stand-in for the competition score
        probs = logits.softmax(dim=1)
        one_hot = F.one_hot(target, logits.shape[1]).float()
        tp = (probs * one_hot).sum(0)
        fp = (probs * (1 - one_hot)).sum(0)
        fn = ((1 - probs) * one_hot).sum(0)
        f1 = 2 * tp / (2 * tp + fp + fn + 1e-7)
        per_class = 1 - f1
        if w is not None:
            return (per_class * w).sum() / w.sum()
        return per_class.mean()

    return compute
