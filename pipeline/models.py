"""Models from timm's factory plus our heads; probabilities for every head and the 18-class joint."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import labels

HEAD_KINDS = ("multihead", "single")
HEAD_SLICES = {"mask": slice(0, 3), "gender": slice(3, 5), "age": slice(5, 8)}


class MaskNet(nn.Module):
    """timm backbone (no classifier) + one linear layer: 3+2+3 logits (multihead) or 18 (single)."""

    def __init__(self, backbone: str, head: str = "multihead", pretrained=False, pretrained_file=None,
                 drop_rate: float = 0.0):
        super().__init__()
        if head not in HEAD_KINDS:
            raise ValueError(f"model.head {head!r} is not one of {', '.join(HEAD_KINDS)}")
        kwargs = {}
        if pretrained_file:
            if not Path(pretrained_file).is_file():
                raise FileNotFoundError(f"pretrained file for {backbone} not found: {pretrained_file}")
            # timm resolves the local file through its normal pretrained path: no network
            kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_file))
            pretrained = True
        if not timm.is_model(backbone):
            raise ValueError(f"model.backbones: {backbone!r} is not a timm model")
        self.backbone = timm.create_model(backbone, pretrained=bool(pretrained), num_classes=0, **kwargs)
        self.head_kind = head
        outputs = 8 if head == "multihead" else labels.NUM_CLASSES
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


def split_logits(logits: torch.Tensor, head: str) -> dict[str, torch.Tensor]:
    if head == "multihead":
        return {name: logits[:, part] for name, part in HEAD_SLICES.items()}
    return {"joint": logits}


def probabilities(logits: torch.Tensor, head: str) -> dict[str, torch.Tensor]:
    """Per-head and 18-class probabilities; the joint of a multihead model is the product of its heads."""
    logits = logits.float()
    if head == "multihead":
        heads = {name: F.softmax(logits[:, part], dim=1) for name, part in HEAD_SLICES.items()}
        joint = heads["mask"][:, :, None, None] * heads["gender"][:, None, :, None] * heads["age"][:, None, None, :]
        return {**heads, "joint": joint.reshape(len(logits), labels.NUM_CLASSES)}
    joint = F.softmax(logits, dim=1)
    cube = joint.reshape(-1, 3, 2, 3)
    return {"mask": cube.sum((2, 3)), "gender": cube.sum((1, 3)), "age": cube.sum((1, 2)), "joint": joint}


TTA_NAMES = ("none", "hflip")


def tta_views(x: torch.Tensor, tta) -> list[torch.Tensor]:
    """Test-time views of a normalised batch: 'none', 'hflip', 'scale:<factor>'."""
    views = []
    for name in tta:
        if name == "none":
            views.append(x)
        elif name == "hflip":
            views.append(torch.flip(x, dims=[3]))
        elif str(name).startswith("scale:"):
            factor = float(str(name).split(":", 1)[1])
            views.append(F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False))
        else:
            raise ValueError(f"infer.tta: unknown view {name!r} (none, hflip, scale:<factor>)")
    return views


def autocast(device: torch.device, enabled: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and enabled else torch.autocast(
        "cpu", enabled=False)


@torch.no_grad()
def predict(model: MaskNet, dataset, device: torch.device, batch_size: int, tta=("none",), amp: bool = True,
            desc: str = "predict") -> dict[str, np.ndarray]:
    """Mean softmax probabilities over TTA views, per head and joint, float32, in dataset order."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    chunks: dict[str, list] = {"mask": [], "gender": [], "age": [], "joint": []}
    for images, _ in tqdm(loader, desc=desc, leave=False):
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        summed = None
        views = tta_views(images, tta)
        for view in views:
            with autocast(device, amp):
                probs = probabilities(model(view), model.head_kind)
            summed = probs if summed is None else {k: summed[k] + probs[k] for k in summed}
        for key in chunks:
            chunks[key].append((summed[key] / len(views)).float().cpu().numpy())
    return {key: np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 1), np.float32)
            for key, parts in chunks.items()}
