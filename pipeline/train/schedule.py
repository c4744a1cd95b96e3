"""The optimizer with its parameter groups, and the learning rate of every group at every optimizer step.

Groups: the backbone's (one, or one per layer with train.layer_decay, from timm's grouping) and the
head's. Every group has an `lr_scale` (backbone: train.backbone_lr_mult x its layer's decay; head: 1)
and a `backbone` flag: while train.freeze_epochs lasts the backbone's LR is 0 and its warmup starts
again when it is unfrozen.
"""
from __future__ import annotations

import math

import torch


def param_groups(cfg: dict, model: torch.nn.Module) -> list[dict]:
    """The backbone's groups, then the head's. Built before anything is frozen (timm skips frozen tensors)."""
    t = cfg["train"]
    if t["layer_decay"]:
        from timm.optim import param_groups_layer_decay

        # timm knows each architecture's layer order (group_matcher); its groups carry lr_scale and
        # weight_decay, 1-D tensors (norms, biases) without weight decay, as in BEiT's recipe
        backbone = param_groups_layer_decay(model.backbone, t["weight_decay"], layer_decay=t["layer_decay"])
        for group in backbone:
            group["lr_scale"] *= t["backbone_lr_mult"]
    else:
        backbone = [{"params": list(model.backbone.parameters()), "lr_scale": t["backbone_lr_mult"]}]
    head = {"params": list(model.head.parameters()), "lr_scale": 1.0, "backbone": False}
    return [{**group, "backbone": True} for group in backbone] + [head]


def make_optimizer(cfg: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg["train"]
    groups = param_groups(cfg, model)
    if t["optimizer"] == "adamw":
        # fused: one kernel for the whole update instead of several per parameter tensor
        fused = all(p.is_cuda for p in model.parameters())
        return torch.optim.AdamW(groups, lr=t["lr"], weight_decay=t["weight_decay"], fused=fused or None)
    return torch.optim.SGD(groups, lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"], nesterov=True)


class Schedule:
    """train.lr per optimizer step: linear warmup, then cosine (to train.min_lr) / step / plateau / none.

    Written here rather than taken from timm: timm's per-step schedulers have no plateau, its plateau
    scheduler warms up per epoch only, and neither restarts the warmup of the groups unfrozen later.
    The LR is a function of the step (plus the plateau's count of cuts), so a resumed job sets exactly
    the rates an uninterrupted one would.
    """

    def __init__(self, cfg: dict, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
        t = cfg["train"]
        self.optimizer, self.kind, self.lr, self.gamma = optimizer, t["schedule"], t["lr"], t["gamma"]
        self.min_lr = min(t["min_lr"], t["lr"])  # a tuned lr below the floor stays constant, never rises
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total = t["epochs"] * self.steps_per_epoch
        self.warmup = round(t["warmup_epochs"] * self.steps_per_epoch)
        self.decay_every = t["step_size"] * self.steps_per_epoch
        self.freeze_epochs = t["freeze_epochs"]
        self.unfreeze = self.freeze_epochs * self.steps_per_epoch
        self.patience = t["plateau_patience"]
        self.plateau = {"best": None, "bad": 0, "cuts": 0}

    def main(self, step: int) -> float:
        """The schedule's LR at `step`, before any warmup ramp."""
        after = max(0, step - self.warmup)
        if self.kind == "cosine":
            progress = min(1.0, after / max(1, self.total - self.warmup))
            return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "step":
            return max(self.min_lr, self.lr * self.gamma ** (after // self.decay_every))
        if self.kind == "plateau":
            return max(self.min_lr, self.lr * self.gamma ** self.plateau["cuts"])
        return self.lr

    def frozen(self, epoch: int) -> bool:
        """Whether the backbone rests in `epoch` (train.freeze_epochs): LR 0 here, no gradients in the loop."""
        return epoch < self.freeze_epochs

    def value(self, step: int, backbone: bool = False) -> float:
        """train.lr's value at `step` for the head, or for the backbone (0 while frozen, then warmed up again)."""
        start = self.unfreeze if backbone else 0
        if step < start:
            return 0.0
        ramp = min(1.0, (step - start + 1) / self.warmup) if self.warmup else 1.0
        return self.main(step) * ramp

    def set(self, step: int) -> None:
        """Set every group's LR for optimizer step `step` (counted from the job's first step)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.value(step, group.get("backbone", False)) * group.get("lr_scale", 1.0)

    def observe(self, val_f1: float) -> None:
        """After each epoch's validation: plateau cuts the LR by gamma after `patience` epochs without a better F1."""
        if self.kind != "plateau":
            return
        if self.plateau["best"] is None or val_f1 > self.plateau["best"]:
            self.plateau.update(best=val_f1, bad=0)
            return
        self.plateau["bad"] += 1
        if self.plateau["bad"] > self.patience:
            self.plateau.update(bad=0, cuts=self.plateau["cuts"] + 1)

    def state_dict(self) -> dict:
        return dict(self.plateau)

    def load_state_dict(self, state: dict) -> None:
        self.plateau = dict(state)
