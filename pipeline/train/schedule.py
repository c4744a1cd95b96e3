"""Optimizer and per-epoch learning-rate schedule from the config."""
from __future__ import annotations

import math

import torch


def make_optimizer(cfg: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg["train"]
    if t["optimizer"] == "adamw":
        # fused: one kernel for the whole update instead of several per parameter tensor
        fused = all(p.is_cuda for p in model.parameters())
        return torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"], fused=fused or None)
    return torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"],
                           nesterov=True)


def lr_factor(cfg: dict, epoch: int) -> float:
    """Multiplier of train.lr in an epoch: linear warmup, then cosine / step / none."""
    t = cfg["train"]
    kind, epochs, warmup = t["schedule"], t["epochs"], t["warmup_epochs"]
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    if kind == "cosine":
        progress = (epoch - warmup) / max(1, epochs - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "step":
        return t["gamma"] ** ((epoch - warmup) // t["step_size"])
    return 1.0


def make_scheduler(cfg: dict, optimizer):
    """Stepped once per epoch; plateau watches validation macro F1 (stepped with it)."""
    t = cfg["train"]
    if t["schedule"] == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=t["gamma"], patience=1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(cfg, epoch))


def step_scheduler(scheduler, val_f1: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_f1)
    else:
        scheduler.step()
