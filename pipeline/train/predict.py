"""Probabilities from a model: every head and the 18-class joint, averaged over TTA views."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import labels
from pipeline.artifacts import BEST, EVAL_PROBS, VAL_PROBS_TTA, Artifact
from pipeline.evaluate.tables import save_probs
from pipeline.io import torch_load
from pipeline.train.augment import eval_transform
from pipeline.train.batches import ImageDataset
from pipeline.train.model import MaskNet, autocast, build_model


def tta_views(x: torch.Tensor, tta) -> list[torch.Tensor]:
    """Test-time views of a normalised batch: 'none', 'hflip', 'scale:<factor>' (names checked at config load)."""
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


@torch.no_grad()
def predict(model: MaskNet, dataset, device: torch.device, batch_size: int, tta=("none",), amp: bool = True,
            desc: str = "predict") -> dict[str, np.ndarray]:
    """Mean softmax probabilities over TTA views, per head and joint (labels.TABLE_KEYS), float32, in dataset order."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    chunks: dict[str, list] = {key: [] for key in labels.TABLE_KEYS}
    for images, _ in tqdm(loader, desc=desc, leave=False):
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        summed = None
        views = tta_views(images, tta)
        for view in views:
            with autocast(device, amp):
                probs = labels.probabilities(model(view), model.head_kind)
            summed = probs if summed is None else {k: summed[k] + probs[k] for k in summed}
        for key in chunks:
            chunks[key].append((summed[key] / len(views)).float().cpu().numpy())
    return {key: np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 1), np.float32)
            for key, parts in chunks.items()}


def load_best_model(cfg: dict, job: Artifact, backbone: str) -> MaskNet:
    """The best checkpoint of a finished, up-to-date training job."""
    job.require()
    checkpoint = torch_load(job.path(BEST))
    model = build_model(cfg, backbone, for_inference=True)
    model.load_state_dict(checkpoint["model"])
    return model


def predict_fold(cfg: dict, model: MaskNet, data, fold: int, eval_table, eval_images, device, out: Artifact) -> None:
    """Write one fold model's TTA'd tables: its validation images (TTA measured on OOF) and the eval images."""
    batch, amp, tta = cfg["infer"]["batch_size"], cfg["train"]["amp"], list(cfg["infer"]["tta"])
    transform = eval_transform(cfg)
    _, val_rows = data.split(fold)
    val_probs = predict(model, ImageDataset(data.images, transform, val_rows), device, batch, tta, amp,
                        desc=f"f{fold} val TTA")
    save_probs(out.path(VAL_PROBS_TTA), data.table.iloc[val_rows], val_probs, fold=fold)
    eval_probs = predict(model, ImageDataset(eval_images, transform), device, batch, tta, amp, desc=f"f{fold} eval")
    save_probs(out.path(EVAL_PROBS), eval_table, eval_probs, fold=fold)
