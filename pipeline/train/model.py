"""Models from timm's factory plus one linear layer holding every head's logits (see labels)."""
from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn as nn

from pipeline import labels
from pipeline.errors import ConfigError, MaskfoldError


class MaskNet(nn.Module):
    """timm backbone (no classifier) + one linear layer: the heads' logits side by side, or 18."""

    def __init__(self, backbone: str, head: str = "multihead", pretrained=False, pretrained_file=None,
                 drop_rate: float = 0.0):
        super().__init__()
        if head not in labels.HEAD_KINDS:
            raise ConfigError(f"model.head {head!r} is not one of {', '.join(labels.HEAD_KINDS)}")
        kwargs = {}
        if pretrained_file:
            if not Path(pretrained_file).is_file():
                raise ConfigError(f"model.pretrained_files: the file for {backbone} was not found: {pretrained_file}")
            # timm resolves the local file through its normal pretrained path: no network
            kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_file))
            pretrained = True
        if not timm.is_model(backbone):
            raise ConfigError(f"model.backbones: {backbone!r} is not a timm model")
        self.backbone = timm.create_model(backbone, pretrained=bool(pretrained), num_classes=0, **kwargs)
        self.head_kind = head
        outputs = labels.num_outputs(head)
        # pooled feature width: head_hidden_size where the model has a pre-logits layer (e.g. MobileNetV3)
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(width, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_model(cfg: dict, backbone: str, for_inference: bool = False) -> MaskNet:
    model_cfg = cfg["model"]
    pretrained_file = None if for_inference else model_cfg["pretrained_files"].get(backbone)
    pretrained = False if for_inference else model_cfg["pretrained"]
    return MaskNet(backbone, model_cfg["head"], pretrained, pretrained_file, model_cfg["drop_rate"])


def autocast(device: torch.device, enabled: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and enabled else torch.autocast(
        "cpu", enabled=False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MaskfoldError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def check_backbones(cfg: dict) -> None:
    """Every configured backbone is a timm model and its pretrained file (if any) exists; all named at once."""
    problems = [f"{b!r} is not a timm model" for b in cfg["model"]["backbones"] if not timm.is_model(b)]
    problems += [f"the file for {b} was not found: {f}" for b, f in cfg["model"]["pretrained_files"].items()
                 if b in cfg["model"]["backbones"] and not Path(f).is_file()]
    if problems:
        raise ConfigError("model.backbones / model.pretrained_files: " + "; ".join(problems))
