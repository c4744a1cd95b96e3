"""Losses from config: ce, focal, smooth (label smoothing) and f1 (soft macro F1), with optional class weights."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# the loss names train.loss allows: pipeline/schema.py reads them from here (torch is imported where a
# loss is built, so reading them costs no torch import)
LOSSES = ("ce", "focal", "smooth", "f1")
IGNORE = -1  # the target of a head a pseudo-labelled image has no label for (pipeline.data.pseudo.UNLABELLED)


def class_weights(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse frequency, normalised to mean 1; classes absent from training get weight 1."""
    import torch

    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 1.0)
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def loss_fn(name: str, weight: torch.Tensor | None, label_smoothing: float, focal_gamma: float):
    import torch.nn.functional as F

    if name not in LOSSES:
        raise ValueError(f"train.loss {name!r} is not one of {', '.join(LOSSES)}")

    on_device: dict = {}  # the weights copied to a device once, not at every step (a blocking copy on CUDA)

    def compute(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The batch's loss; rows whose target is IGNORE (a pseudo-label's unknown head) add nothing. Masked by
        multiplication, never by indexing: a boolean index would wait for the GPU at every step."""
        logits = logits.float()
        w = None
        if weight is not None:
            if logits.device not in on_device:
                on_device[logits.device] = weight.to(logits.device)
            w = on_device[logits.device]
        known = (target != IGNORE).float()
        target = target.clamp(min=0)
        row_weight = known * (w[target] if w is not None else 1.0)  # what F.cross_entropy's mean divides by
        if name in ("ce", "smooth"):
            smoothing = label_smoothing if name == "smooth" else 0.0
            per_row = F.cross_entropy(logits, target, weight=w, label_smoothing=smoothing, reduction="none")
            return (per_row * known).sum() / row_weight.sum().clamp(min=1e-12)
        if name == "focal":
            log_p = F.log_softmax(logits, dim=1)
            log_pt = log_p.gather(1, target[:, None]).squeeze(1)
            focal = (1 - log_pt.exp()) ** focal_gamma * -log_pt
            return (focal * row_weight).sum() / row_weight.sum().clamp(min=1e-12)
        if name != "f1":
            raise AssertionError(f"train.loss {name!r} is in LOSSES but has no implementation here")
        # soft macro F1 over the batch: differentiable stand-in for the competition score
        probs = logits.softmax(dim=1) * known[:, None]
        one_hot = F.one_hot(target, logits.shape[1]).float() * known[:, None]
        tp = (probs * one_hot).sum(0)
        fp = (probs * (1 - one_hot)).sum(0)
        fn = ((known[:, None] - probs) * one_hot).sum(0)
        f1 = 2 * tp / (2 * tp + fp + fn + 1e-7)
        per_class = 1 - f1
        if w is not None:
            return (per_class * w).sum() / w.sum()
        return per_class.mean()

    return compute


def soft_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to a teacher's probabilities (rows of `target` sum to 1): what a student learns from."""
    import torch.nn.functional as F

    return -(target.float() * F.log_softmax(logits.float(), dim=1)).sum(1).mean()
