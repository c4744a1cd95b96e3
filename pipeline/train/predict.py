"""Probabilities from a model: every head and the 18-class joint, averaged over TTA views.

One batched path for per-epoch validation and the infer stage: batches are cut from the uint8 cache
(resident on the GPU when it fits), normalised on the device, the TTA views of a batch that share a
shape go through the model as one forward batch, and the outputs stay on the device until one copy
at the end.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pipeline import labels
from pipeline.artifacts import BEST, EVAL_PROBS, VAL_PROBS_TTA, Artifact, infer_artifact, train_artifact
from pipeline.data.dataset import InferData
from pipeline.evaluate.tables import save_probs
from pipeline.io import torch_load, write_provenance
from pipeline.progress import progress
from pipeline.train import backends
from pipeline.train.augment import Normalize
from pipeline.train.batches import eval_batches
from pipeline.train.model import MaskNet, build_model, prepare_model
from pipeline.train.precision import autocast, resolve as resolve_precision
from pipeline.train.views import tta_views


def _forward_views(model: MaskNet, views: list[torch.Tensor], precision: str, channels_last: bool) -> dict:
    """Sum over views of each table's probabilities; views of one shape share a forward batch."""
    by_shape: dict[tuple, list] = {}
    for view in views:
        by_shape.setdefault(tuple(view.shape), []).append(view)
    summed = None
    for group in by_shape.values():
        batch = torch.cat(group) if len(group) > 1 else group[0]
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(batch.device, precision):
            probs = labels.probabilities(model(batch), model.head_kind, model.heads)
        probs = {k: v.float().unflatten(0, (len(group), -1)).sum(0) for k, v in probs.items()}
        summed = probs if summed is None else {k: summed[k] + probs[k] for k in summed}
    return summed


def pads_batches(device: torch.device) -> bool:
    return device.type == "cuda"


@torch.no_grad()
def predict(model: MaskNet, store, rows, normalize: Normalize, batch_size: int, tta=("none",), precision: str = "fp32",
            desc: str = "predict") -> dict[str, np.ndarray]:
    """Mean softmax probabilities over TTA views of the images at `rows`, per head and joint
    (labels.TABLE_KEYS), float32, in row order. `store` is the uint8 cache (see dataset.resident)."""
    model.eval()
    device = normalize.device
    rows = np.asarray(rows)
    tables: dict[str, torch.Tensor] = {}
    # on CUDA the last batch is padded to the full size: one input shape, so cuDNN's autotuner (train.cudnn_benchmark)
    # tunes once rather than again for every tail batch. On the H200 (2026-12-04) a tail batch of efficientnet_b0
    # cost 5 to 10 s of autotuning: the whole validation of a 600-person fold ran at 151 images/s
    batches = eval_batches(store, rows, device, batch_size, pad=pads_batches(device))
    for start, images in progress(batches, total=math.ceil(len(rows) / batch_size), desc=desc, unit="batch",
                                  leave=False):
        views = tta_views(normalize(images), tta)
        summed = _forward_views(model, views, precision, normalize.channels_last)
        count = min(batch_size, len(rows) - start)
        for key, value in summed.items():
            if key not in tables:
                tables[key] = torch.empty((len(rows), value.shape[1]), dtype=torch.float32, device=device)
            tables[key][start:start + count] = value[:count] / len(views)
    if not tables:
        return {key: np.zeros((0, 1), np.float32) for key in labels.table_keys(model.heads)}
    return {key: value.cpu().numpy() for key, value in tables.items()}  # the one copy back


def eval_normalize(cfg: dict, device: torch.device) -> Normalize:
    """Evaluation input: no augmentation; channels_last where the model is (CUDA and train.channels_last)."""
    return Normalize(cfg, device, channels_last=device.type == "cuda" and cfg["train"]["channels_last"])


def load_best_model(cfg: dict, job: Artifact, backbone: str, device: torch.device) -> MaskNet:
    """The best checkpoint of a finished, up-to-date training job, on the device, ready to predict."""
    job.require()
    checkpoint = torch_load(job.path(BEST))
    model = build_model(cfg, backbone, for_inference=True)
    model.load_state_dict(checkpoint["model"])
    return prepare_model(cfg, model, device)


def predict_fold(cfg: dict, model: MaskNet, data, fold: int, eval_table, stores: dict, device, out: Artifact) -> None:
    """Write one fold model's TTA'd tables: its validation images (TTA measured on OOF) and the eval images.

    `stores` holds the uint8 caches as dataset.resident made them: {"train": ..., "eval": ...}.
    """
    batch, tta = cfg["infer"]["batch_size"], list(cfg["infer"]["tta"])
    precision = resolve_precision(cfg["train"]["precision"], device)
    normalize = eval_normalize(cfg, device)
    _, val_rows = data.split(fold)
    val_probs = predict(model, stores["train"], val_rows, normalize, batch, tta, precision, desc=f"f{fold} val TTA")
    save_probs(out.path(VAL_PROBS_TTA), data.table.iloc[val_rows], val_probs, fold=fold)
    eval_probs = predict(model, stores["eval"], np.arange(len(eval_table)), normalize, batch, tta, precision,
                         desc=f"f{fold} eval")
    save_probs(out.path(EVAL_PROBS), eval_table, eval_probs, fold=fold)


def infer_job(cfg: dict, backbone: str, fold: int, inputs: InferData, force: bool = False):
    """One fold model's inference tables under <output.dir>/infer/<backbone>/fold<k>/, made from its current
    checkpoint, TTA and eval images; skipped when they already are (unless `force`). Returns the folder."""
    job = train_artifact(cfg, backbone, fold, inputs.train.fingerprint)
    out = infer_artifact(cfg, backbone, fold, job.read_stamp()["token"], inputs.eval_key)
    device = backends.job_device(cfg)  # cudnn.benchmark and TF32 as in training
    with out.lock():
        if out.is_fresh() and not force:
            print(f"[infer] {out.state()[1]}; skipping (--force to redo)")
            return out.folder
        out.invalidate()
        model = load_best_model(cfg, job, backbone, device)
        predict_fold(cfg, model, inputs.train, fold, inputs.eval_table, inputs.stores(device), device, out)
        write_provenance(out.folder, cfg, cfg["train"]["seed"], {"train_job": job.key, "data_fingerprint":
                                                                 inputs.train.fingerprint, "tta": cfg["infer"]["tta"]})
        out.seal(backbone=backbone, fold=fold)
    print(f"[infer] {backbone} fold {fold}: {len(inputs.eval_table)} eval images and its validation images, "
          f"TTA {cfg['infer']['tta']}")
    return out.folder
