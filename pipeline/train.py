"""train stage: every (backbone, fold) job trains on the other folds and validates on its own.

Per job, under <output.dir>/train/<backbone>/fold<k>/:
  last.pt          every epoch: model, optimizer, scheduler, epoch, early-stopping state, RNG state
  best.pt          model at the best validation macro F1
  val_probs.npz    that fold's validation probabilities at the best epoch (per head + 18-class)
  metrics.jsonl    one line per epoch; tb/ TensorBoard scalars
  done.json        the job's summary, written last
A killed job continues from last.pt; every epoch reseeds from (seed, epoch), so a resumed run
ends exactly where an uninterrupted one does. A last.pt made under another config is refused.
"""
from __future__ import annotations

import functools
import json
import math
import random
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pipeline import labels
from pipeline.augment import eval_transform, train_transform
from pipeline.config import stage_main
from pipeline.data import ImageDataset, cached_images, data_fingerprint, load_train
from pipeline.folds import load_folds
from pipeline.io import (atomic_torch_save, atomic_write_json, atomic_write_text, git_commit,
                         torch_load, write_provenance)
from pipeline.jobs import job_dir, job_hash, job_list, save_probs
from pipeline.losses import class_weights, loss_fn
from pipeline.metrics import score_probs
from pipeline.models import autocast, build_model, predict, split_logits


class StaleCheckpointError(RuntimeError):
    pass


@dataclass
class TrainData:
    """Everything jobs share: the image table, each row's fold, decoded images and targets."""
    table: object
    fold: np.ndarray
    images: np.ndarray
    train_targets: dict  # training cut (data.train_old_age)
    fingerprint: str


def load_train_data(cfg: dict) -> TrainData:
    table, _ = load_train(cfg)
    fold = load_folds(cfg, table).to_numpy()
    images = cached_images(cfg, table["file"], desc="decode train")
    band = labels.age_band(table["age"].to_numpy(), cfg["data"]["train_old_age"])
    targets = {"mask": table["mask"].to_numpy(), "gender": table["gender"].to_numpy(), "age": band,
               "joint": labels.class_index(table["mask"].to_numpy(), table["gender"].to_numpy(), band)}
    return TrainData(table, fold, images, targets, data_fingerprint(table))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def make_optimizer(cfg: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg["train"]
    if t["optimizer"] == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    if t["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"],
                               nesterov=True)
    raise ValueError(f"train.optimizer {t['optimizer']!r} is not adamw or sgd")


def make_scheduler(cfg: dict, optimizer):
    """Per-epoch schedule. Linear warmup, then cosine / step / none; plateau watches val F1."""
    t = cfg["train"]
    kind, epochs, warmup = t["schedule"], t["epochs"], t["warmup_epochs"]
    if kind == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=t["gamma"], patience=1)
    if kind not in ("cosine", "step", "none"):
        raise ValueError(f"train.schedule {kind!r} is not cosine, step, plateau or none")

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        if kind == "cosine":
            progress = (epoch - warmup) / max(1, epochs - warmup)
            return 0.5 * (1 + math.cos(math.pi * progress))
        if kind == "step":
            return t["gamma"] ** ((epoch - warmup) // t["step_size"])
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def same_label_cutmix(images: torch.Tensor, label: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """CutMix that only pastes between images with the same label, so the label stays exact."""
    mixed = images.clone()
    _, _, height, width = images.shape
    for value in label.unique():
        members = (label == value).nonzero().squeeze(1)
        if len(members) < 2:
            continue
        partners = members[torch.randperm(len(members), generator=generator)]
        lam = float(torch.rand(1, generator=generator)) * 0.5 + 0.25
        cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        y0 = int(torch.randint(0, height - cut_h + 1, (1,), generator=generator))
        x0 = int(torch.randint(0, width - cut_w + 1, (1,), generator=generator))
        mixed[members, :, y0:y0 + cut_h, x0:x0 + cut_w] = images[partners, :, y0:y0 + cut_h, x0:x0 + cut_w]
    return mixed


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1000 + epoch


def _seed_worker(epoch_seed: int, worker_id: int) -> None:
    """albumentations 2.0 does not split its stream across DataLoader workers: give each its own."""
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(epoch_seed + 7919 * (worker_id + 1))


def _reseed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_job(cfg: dict, backbone: str, fold: int, data: TrainData | None = None, force: bool = False,
              epoch_callback=None) -> dict:
    """Train one (backbone, fold) job to its early stop; returns the summary written to done.json.

    epoch_callback(epoch, record) runs after each epoch's checkpoint (Optuna pruning raises from it).
    """
    data = data or load_train_data(cfg)
    folder = job_dir(cfg, backbone, fold)
    this_hash = job_hash(cfg, backbone, data.fingerprint)
    done_path, last_path, best_path = folder / "done.json", folder / "last.pt", folder / "best.pt"
    if force and folder.exists():
        shutil.rmtree(folder)
    if done_path.exists():
        summary = json.loads(done_path.read_text())
        if summary.get("job_hash") == this_hash:
            print(f"[train] {backbone} fold {fold}: done (best F1 {summary['best_f1']:.4f} at epoch "
                  f"{summary['best_epoch']}); skipping (--force to retrain)")
            return summary
        raise StaleCheckpointError(f"{done_path} was made under a different config (hash {summary.get('job_hash')}, "
                                   f"now {this_hash}); use another output.dir or --force to retrain")

    t = cfg["train"]
    if t["threads"]:
        torch.set_num_threads(t["threads"])
    device = resolve_device(t["device"])
    job_seed = t["seed"] * 100 + fold
    _reseed(job_seed)
    model = build_model(cfg, backbone).to(device)
    if device.type == "cuda" and t["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer)

    train_rows = np.flatnonzero(data.fold != fold)
    val_rows = np.flatnonzero(data.fold == fold)
    if len(val_rows) == 0 or len(train_rows) == 0:
        raise ValueError(f"fold {fold} leaves no training or no validation images")
    state = {"epoch": 0, "best_f1": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": []}
    if last_path.exists():
        checkpoint = torch_load(last_path)
        if checkpoint.get("job_hash") != this_hash:
            raise StaleCheckpointError(
                f"{last_path} was made under a different config (hash {checkpoint.get('job_hash')}, now {this_hash}); "
                f"refusing to resume it. Use another output.dir, or --force to discard it and retrain")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        state = checkpoint["state"]
        torch.set_rng_state(checkpoint["torch_rng"])
        print(f"[train] {backbone} fold {fold}: resuming from {last_path} at epoch {state['epoch']}")
    write_provenance(folder, cfg, job_seed,
                     {"job_hash": this_hash, "data_fingerprint": data.fingerprint, "backbone": backbone, "fold": fold})

    targets = {k: v[train_rows] for k, v in data.train_targets.items()}
    heads = ("mask", "gender", "age") if model.head_kind == "multihead" else ("joint",)
    sizes = {**labels.HEADS, "joint": labels.NUM_CLASSES}
    weights = {h: class_weights(targets[h], sizes[h]) if t["class_weights"] else None for h in heads}
    head_weights = cfg["model"]["head_weights"]
    criteria = {h: loss_fn(t["loss"], weights[h], t["label_smoothing"], t["focal_gamma"]) for h in heads}
    transform = train_transform(cfg)
    train_set = ImageDataset(data.images, targets, transform, rows=train_rows)
    val_set = ImageDataset(data.images, None, eval_transform(cfg), rows=val_rows)
    val_table = data.table.iloc[val_rows]
    sample_weights = None
    if t["weighted_sampler"]:
        counts = np.bincount(targets["joint"], minlength=labels.NUM_CLASSES)
        sample_weights = torch.tensor(1.0 / counts[targets["joint"]], dtype=torch.double)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder / "tb"), purge_step=state["epoch"])
    try:
        while state["epoch"] < t["epochs"] and state["bad_epochs"] < t["patience"]:
            epoch = state["epoch"]
            seed = _epoch_seed(job_seed, epoch)
            _reseed(seed)
            transform.set_random_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            sampler = (torch.utils.data.WeightedRandomSampler(sample_weights, len(train_rows), replacement=True,
                                                              generator=generator)
                       if sample_weights is not None else torch.utils.data.RandomSampler(train_set, generator=generator))
            workers = cfg["data"]["num_workers"] if device.type == "cuda" else 0
            loader = torch.utils.data.DataLoader(train_set, batch_size=t["batch_size"], sampler=sampler,
                                                 num_workers=workers, drop_last=len(train_rows) > t["batch_size"],
                                                 pin_memory=device.type == "cuda",
                                                 worker_init_fn=functools.partial(_seed_worker, seed) if workers else None)
            model.train()
            started, seen, loss_sum = time.time(), 0, {h: 0.0 for h in heads}
            total_batches = min(len(loader), t["max_batches"] or len(loader))
            bar = tqdm(loader, total=total_batches, desc=f"{backbone} f{fold} e{epoch}", leave=False)
            for step, (images, batch_targets) in enumerate(bar):
                if step >= total_batches:
                    break
                images = images.to(device, non_blocking=True)
                if device.type == "cuda" and t["channels_last"]:
                    images = images.contiguous(memory_format=torch.channels_last)
                batch_targets = {k: v.to(device) for k, v in batch_targets.items()}
                if t["cutmix_p"] and float(torch.rand(1, generator=generator)) < t["cutmix_p"]:
                    images = same_label_cutmix(images, batch_targets["joint"], generator)
                with autocast(device, t["amp"]):
                    outputs = split_logits(model(images), model.head_kind)
                losses = {h: criteria[h](outputs[h], batch_targets[h]) for h in heads}
                loss = sum(head_weights.get(h, 1.0) * losses[h] for h in heads)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seen += len(images)
                for h in heads:
                    loss_sum[h] += float(losses[h].detach()) * len(images)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            train_seconds = time.time() - started
            val_probs = predict(model, val_set, device, cfg["infer"]["batch_size"], amp=t["amp"], desc="validate")
            scores = score_probs(val_probs, val_table["label"].to_numpy())
            lr = optimizer.param_groups[0]["lr"]
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(scores["f1"])
            else:
                scheduler.step()
            record = {"epoch": epoch, "lr": lr, "images_per_s": seen / max(train_seconds, 1e-9),
                      **{f"loss_{h}": loss_sum[h] / max(seen, 1) for h in heads},
                      **{f"val_{k}": v for k, v in scores.items()}}
            improved = scores["f1"] > state["best_f1"]
            if improved:
                state.update(best_f1=scores["f1"], best_epoch=epoch, bad_epochs=0)
                atomic_torch_save(best_path, {"model": model.state_dict(), "backbone": backbone,
                                              "head": model.head_kind, "epoch": epoch, "val_f1": scores["f1"],
                                              "job_hash": this_hash, "fold": fold})
                save_probs(folder / "val_probs.npz", val_table, val_probs, backbone=backbone, fold=fold)
            else:
                state["bad_epochs"] += 1
            state["history"].append(record)
            state["epoch"] = epoch + 1
            atomic_torch_save(last_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "scheduler": scheduler.state_dict(), "state": state,
                                          "torch_rng": torch.get_rng_state(), "job_hash": this_hash})
            atomic_write_text(folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state["history"]))
            for key, value in record.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch)
            writer.flush()
            print(f"[train] {backbone} fold {fold} epoch {epoch}: val F1 {scores['f1']:.4f} "
                  f"(mask {scores['f1_mask']:.3f} gender {scores['f1_gender']:.3f} age {scores['f1_age']:.3f}) "
                  f"{record['images_per_s']:.0f} img/s{'  *best' if improved else ''}")
            if epoch_callback is not None:
                epoch_callback(epoch, record)
    finally:
        writer.close()
    summary = {"backbone": backbone, "fold": fold, "best_epoch": state["best_epoch"], "best_f1": state["best_f1"],
               "epochs_run": state["epoch"], "job_hash": this_hash, "seed": job_seed, "git_commit": git_commit(),
               "data_fingerprint": data.fingerprint, "history": state["history"]}
    atomic_write_json(done_path, summary)
    return summary


def run(cfg: dict, force: bool = False) -> list[dict]:
    data = load_train_data(cfg)
    jobs = job_list(cfg)
    summaries = []
    for number, (backbone, fold) in enumerate(jobs, start=1):
        print(f"[train] job {number}/{len(jobs)}: {backbone} fold {fold}")
        summaries.append(train_job(cfg, backbone, fold, data, force=force))
    for s in summaries:
        print(f"  {s['backbone']:<32} fold {s['fold']}  best val F1 {s['best_f1']:.4f} at epoch {s['best_epoch']}")
    return summaries


if __name__ == "__main__":
    stage_main(run, "Train every (backbone, fold) job with early stopping and resumable checkpoints")
