"""One (backbone, fold) training job: train on the other folds, validate on its own, stop early.

Per job, under <output.dir>/train/<backbone>/fold<k>/:
  last.pt          every epoch: model, optimizer, scheduler, loop state, RNG state
  best.pt          model at the best validation macro F1
  val_probs.npz    that fold's validation probabilities at the best epoch (per head + 18-class)
  metrics.jsonl    one line per epoch; tb/ TensorBoard scalars
  done.json        the stamp (see pipeline.artifacts), written last
Every epoch reseeds from (seed, fold, epoch) and every drawn sample's augmentation from its draw
position, so a job killed anywhere continues from last.pt to exactly where an uninterrupted run ends.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from pipeline import labels
from pipeline.artifacts import LAST, METRICS, VAL_PROBS, Artifact, train_artifact
from pipeline.data.dataset import TrainData, load_train_data
from pipeline.errors import StaleArtifactError
from pipeline.evaluate.metrics import score_probs
from pipeline.evaluate.tables import save_probs
from pipeline.io import atomic_write_text, write_provenance
from pipeline.train import checkpoint
from pipeline.train.augment import eval_transform, train_transform
from pipeline.train.batches import EpochSampler, ImageDataset, same_label_cutmix, sampler_weights
from pipeline.train.losses import class_weights, loss_fn
from pipeline.train.model import autocast, build_model, resolve_device
from pipeline.train.predict import predict
from pipeline.train.schedule import make_optimizer, make_scheduler, step_scheduler


@dataclass
class LoopState:
    """What early stopping and the epoch counter know; saved in last.pt as a plain dict."""
    epoch: int = 0
    best_f1: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list = field(default_factory=list)

    def improve(self, epoch: int, f1: float) -> bool:
        if f1 > self.best_f1:
            self.best_f1, self.best_epoch, self.bad_epochs = f1, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def finished(self, epochs: int, patience: int) -> bool:
        return self.epoch >= epochs or self.bad_epochs >= patience


@dataclass
class Job:
    """Everything one job trains and validates with."""
    backbone: str
    fold: int
    seed: int
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    criteria: dict
    train_set: ImageDataset
    val_set: ImageDataset
    val_table: object
    sample_weights: torch.Tensor | None


def _reseed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_job(cfg: dict, backbone: str, fold: int, data: TrainData) -> Job:
    t = cfg["train"]
    if t["threads"]:
        torch.set_num_threads(t["threads"])
    device = resolve_device(t["device"])
    seed = t["seed"] * 100 + fold
    _reseed(seed)
    model = build_model(cfg, backbone).to(device)
    if device.type == "cuda" and t["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    train_rows, val_rows = data.split(fold)
    targets = data.train_targets
    criteria = {head: loss_fn(t["loss"], _head_class_weights(cfg, targets[head][train_rows], head),
                              t["label_smoothing"], t["focal_gamma"])
                for head in labels.trained_heads(cfg["model"]["head"])}
    return Job(backbone, fold, seed, device, model, optimizer, make_scheduler(cfg, optimizer), criteria,
               train_set=ImageDataset(data.images, train_transform(cfg), train_rows, targets),
               val_set=ImageDataset(data.images, eval_transform(cfg), val_rows),
               val_table=data.table.iloc[val_rows],
               sample_weights=sampler_weights(targets["joint"][train_rows]) if t["weighted_sampler"] else None)


def _head_class_weights(cfg: dict, head_targets: np.ndarray, head: str):
    if not cfg["train"]["class_weights"]:
        return None
    return class_weights(head_targets, {**labels.HEADS, "joint": labels.NUM_CLASSES}[head])


def train_one_epoch(cfg: dict, job: Job, epoch: int) -> dict:
    """One pass over the epoch's draws; returns mean loss per head and images per second."""
    t = cfg["train"]
    epoch_seed = job.seed * 1000 + epoch
    _reseed(epoch_seed)
    generator = torch.Generator().manual_seed(epoch_seed)
    job.train_set.epoch_seed = epoch_seed
    workers = cfg["data"]["num_workers"] if job.device.type == "cuda" else 0
    loader = torch.utils.data.DataLoader(
        job.train_set, batch_size=t["batch_size"], num_workers=workers, pin_memory=job.device.type == "cuda",
        sampler=EpochSampler(len(job.train_set), epoch_seed, job.sample_weights),
        drop_last=len(job.train_set) > t["batch_size"])
    head_weights = cfg["model"]["head_weights"]
    job.model.train()
    started, seen, loss_sum = time.time(), 0, {head: 0.0 for head in job.criteria}
    batches = min(len(loader), t["max_batches"] or len(loader))
    bar = tqdm(loader, total=batches, desc=f"{job.backbone} f{job.fold} e{epoch}", leave=False)
    for step, (images, targets) in enumerate(bar):
        if step >= batches:
            break
        images = images.to(job.device, non_blocking=True)
        if job.device.type == "cuda" and t["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = {k: v.to(job.device) for k, v in targets.items()}
        if t["cutmix_p"] and float(torch.rand(1, generator=generator)) < t["cutmix_p"]:
            images = same_label_cutmix(images, targets["joint"], generator)
        with autocast(job.device, t["amp"]):
            outputs = labels.split_logits(job.model(images), cfg["model"]["head"])
        losses = {head: criterion(outputs[head], targets[head]) for head, criterion in job.criteria.items()}
        loss = sum(head_weights.get(head, 1.0) * value for head, value in losses.items())
        job.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        job.optimizer.step()
        seen += len(images)
        for head, value in losses.items():
            loss_sum[head] += float(value.detach()) * len(images)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    return {"images_per_s": seen / max(time.time() - started, 1e-9),
            **{f"loss_{head}": total / max(seen, 1) for head, total in loss_sum.items()}}


def validate(cfg: dict, job: Job) -> tuple[dict, dict]:
    """Validation probabilities (no augmentation) and their scores against the official labels."""
    probs = predict(job.model, job.val_set, job.device, cfg["infer"]["batch_size"], amp=cfg["train"]["amp"],
                    desc="validate")
    return probs, score_probs(probs, job.val_table["label"].to_numpy())


def _log_epoch(artifact: Artifact, writer, state: LoopState, record: dict, improved: bool, job: Job) -> None:
    atomic_write_text(artifact.path(METRICS), "".join(json.dumps(r) + "\n" for r in state.history))
    for key, value in record.items():
        if key != "epoch":
            writer.add_scalar(key, value, record["epoch"])
    writer.flush()
    print(f"[train] {job.backbone} fold {job.fold} epoch {record['epoch']}: val F1 {record['val_f1']:.4f} "
          f"(mask {record['val_f1_mask']:.3f} gender {record['val_f1_gender']:.3f} age {record['val_f1_age']:.3f}) "
          f"{record['images_per_s']:.0f} img/s{'  *best' if improved else ''}")


def _start(artifact: Artifact, force: bool) -> dict | None:
    """The stamp of a finished, up-to-date job (skip it), or None to train; a stale stamp is refused."""
    status, message = artifact.state()
    if status == "stale" and not force:
        raise StaleArtifactError(message)
    incomplete = status == "missing" and artifact.stamp_path.exists()  # stamped, but an output file is gone
    if incomplete:
        print(f"[train] {message}: training it again")
    if (force or incomplete) and artifact.folder.exists():
        shutil.rmtree(artifact.folder)
    return artifact.read_stamp() if status == "fresh" and not force else None


def train_job(cfg: dict, backbone: str, fold: int, data: TrainData | None = None, force: bool = False,
              epoch_callback=None) -> dict:
    """Train one job to its early stop; returns its stamp (the summary in done.json).

    epoch_callback(epoch, record) runs after each epoch's checkpoint (Optuna pruning raises from it).
    """
    data = data or load_train_data(cfg)
    artifact = train_artifact(cfg, backbone, fold, data.fingerprint)
    with artifact.lock():  # two runs on one job folder would mix their files
        done = _start(artifact, force)
        if done is not None:
            print(f"[train] {backbone} fold {fold}: done (best F1 {done['best_f1']:.4f} at epoch "
                  f"{done['best_epoch']}); skipping (--force to retrain)")
            return done
        return _train(cfg, artifact, backbone, fold, data, epoch_callback)


def _train(cfg: dict, artifact: Artifact, backbone: str, fold: int, data: TrainData, epoch_callback) -> dict:
    """Build the job, resume it if last.pt is there, and run epochs until it stops; seal the stamp last."""
    job = build_job(cfg, backbone, fold, data)
    saved = checkpoint.resume(artifact, job.model, job.optimizer, job.scheduler)
    state = LoopState(**saved) if saved else LoopState()
    if saved:
        print(f"[train] {backbone} fold {fold}: resuming from {artifact.path(LAST)} at epoch {state.epoch}")
    write_provenance(artifact.folder, cfg, job.seed, {"job_key": artifact.key, "data_fingerprint": data.fingerprint,
                                                      "backbone": backbone, "fold": fold})
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(artifact.path("tb")), purge_step=state.epoch) as writer:
        while not state.finished(cfg["train"]["epochs"], cfg["train"]["patience"]):
            epoch = state.epoch
            record = {"epoch": epoch, "lr": job.optimizer.param_groups[0]["lr"], **train_one_epoch(cfg, job, epoch)}
            val_probs, scores = validate(cfg, job)
            record.update({f"val_{k}": v for k, v in scores.items()})
            step_scheduler(job.scheduler, scores["f1"])
            improved = state.improve(epoch, scores["f1"])
            if improved:
                checkpoint.save_best(artifact, job.model, backbone, fold, epoch, scores["f1"])
                save_probs(artifact.path(VAL_PROBS), job.val_table, val_probs, backbone=backbone, fold=fold)
            state.history.append(record)
            state.epoch = epoch + 1
            checkpoint.save_last(artifact, job.model, job.optimizer, job.scheduler, asdict(state))
            _log_epoch(artifact, writer, state, record, improved, job)
            if epoch_callback is not None:
                epoch_callback(epoch, record)
    return artifact.seal(backbone=backbone, fold=fold, best_epoch=state.best_epoch, best_f1=state.best_f1,
                         epochs_run=state.epoch, seed=job.seed, data_fingerprint=data.fingerprint,
                         history=state.history)
