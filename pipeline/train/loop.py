"""One (backbone, fold) training job: train on the other folds, validate on its own, stop early.

Per job, under <output.dir>/train/<backbone>/fold<k>/:
  last.pt          every train.checkpoint_every epochs and after the last: model, EMA, optimizer, schedule, loop
                   state, RNG state
  best.pt          model (its EMA when train.ema_decay > 0) at the best validation macro F1
  val_probs.npz    that fold's validation probabilities at the best epoch (per head + 18-class)
  metrics.jsonl    one line per epoch; tb/ TensorBoard scalars; wandb/ with log.wandb (pipeline.train.tracking)
  done.json        the stamp (see pipeline.artifacts), written last
Every epoch reseeds from (seed, fold, epoch) and every drawn sample's augmentation from its draw
position, and the LR is a function of the step, so a job killed anywhere continues from last.pt to
exactly where an uninterrupted run ends (redoing the epochs since last.pt, which give the same results).

The recipe: for train.freeze_epochs the backbone is frozen (no gradients, BatchNorm statistics kept)
and only the head trains; then everything trains, the backbone at train.backbone_lr_mult x the LR
(and train.layer_decay per layer), its warmup started again. With train.ema_decay, an EMA of the
weights (timm's ModelEmaV3) is what validation, early stopping, best.pt and so inference see.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from pipeline import labels
from pipeline.artifacts import LAST, METRICS, VAL_PROBS, Artifact, train_artifact
from pipeline.data.dataset import TrainData, load_train_data
from pipeline.errors import StaleArtifactError
from pipeline.evaluate.metrics import score_probs
from pipeline.evaluate.tables import save_probs
from pipeline.io import atomic_write_text, write_provenance
from pipeline.progress import progress
from pipeline.train import backends, checkpoint
from pipeline.train.augment import Normalize, gpu_augmenter, train_transform
from pipeline.train.augment import engine as augment_engine
from pipeline.train.batches import DeviceBatches, ImageDataset, LoaderBatches, same_label_cutmix, sampler_weights
from pipeline.train.losses import class_weights, loss_fn, soft_loss
from pipeline.train.model import build_model, prepare_model
from pipeline.train.precision import autocast, grad_scaler, resolve as resolve_precision
from pipeline.train.predict import eval_normalize, predict
from pipeline.train.schedule import Schedule, make_optimizer
from pipeline.train.tracking import RunLog

PROGRESS_EVERY = 25  # steps between progress-bar loss updates (each one reads the loss: a host sync)


@dataclass
class LoopState:
    """What early stopping and the epoch counter know; saved in last.pt as a plain dict."""
    epoch: int = 0
    best_f1: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list = field(default_factory=list)
    wandb_id: str | None = None  # the job's W&B run, continued on resume (log.wandb)

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
    """Everything one job trains and validates with, built once per job."""
    backbone: str
    fold: int
    seed: int
    device: torch.device
    model: torch.nn.Module
    ema: object                              # timm ModelEmaV3, or None (train.ema_decay: 0)
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    criteria: dict                           # head -> (batch target key, loss): see _criteria
    batches: LoaderBatches | DeviceBatches   # the training draws, uint8 on the device
    prepare: Normalize                       # uint8 -> model input (with the kornia augmentation, if that engine)
    store: object                            # the uint8 cache validation batches are cut from
    val_rows: np.ndarray
    val_table: object
    steps_per_epoch: int
    heads: tuple = tuple(labels.HEADS)       # the heads this backbone predicts (model.tasks)
    precision: str = "fp32"                  # resolved train.precision: bf16, fp16 or fp32 (pipeline.train.precision)
    scaler: object = None                    # torch's GradScaler under fp16, else None

    @property
    def eval_model(self) -> torch.nn.Module:
        """What validation, best.pt and inference use: the EMA weights when on."""
        return self.ema.module if self.ema is not None else self.model

    def frozen(self, epoch: int) -> bool:
        return self.schedule.frozen(epoch)


def _reseed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_job(cfg: dict, backbone: str, fold: int, data: TrainData) -> Job:
    t = cfg["train"]
    if t["threads"]:
        torch.set_num_threads(t["threads"])
    device = backends.job_device(cfg)
    seed = t["seed"] * 100 + fold
    _reseed(seed)
    model = prepare_model(cfg, build_model(cfg, backbone), device)
    optimizer = make_optimizer(cfg, model)  # before any freezing: every parameter has its group
    ema = None
    if t["ema_decay"]:
        from timm.utils import ModelEmaV3

        # decay warmed up (timm's use_warmup): early on the average follows the weights closely
        ema = ModelEmaV3(model, decay=t["ema_decay"], use_warmup=True)
    train_rows, val_rows = data.split(fold)
    targets = data.train_targets
    criteria = _criteria(cfg, data, train_rows, labels.model_heads(cfg["model"]["tasks"], backbone))
    if data.soft_targets is not None:  # a student: each head learns the teacher's probabilities
        targets = {**targets, **{f"soft_{key}": value for key, value in data.soft_targets.items()}}
    weights = sampler_weights(targets["group"][train_rows]) if t["weighted_sampler"] else None
    channels_last = device.type == "cuda" and t["channels_last"]
    store = data.store(device)
    if augment_engine(cfg, device) == "kornia":
        batches = DeviceBatches(store, train_rows, targets, t["batch_size"], device, weights)
        prepare = Normalize(cfg, device, gpu_augmenter(cfg), channels_last)
    else:
        workers = cfg["data"]["num_workers"] if device.type == "cuda" else 0
        dataset = ImageDataset(data.images, train_transform(cfg), train_rows, targets)
        batches = LoaderBatches(dataset, t["batch_size"], workers, device, weights)
        prepare = Normalize(cfg, device, None, channels_last)
    drawn = min(len(batches), t["max_batches"] or len(batches))
    if drawn < t["accumulate"]:
        from pipeline.errors import ConfigError

        raise ConfigError(f"train.accumulate: {t['accumulate']} batches per optimizer step, but an epoch of {backbone} "
                          f"fold {fold} draws {drawn} batches of train.batch_size {t['batch_size']}")
    steps = drawn // t["accumulate"]  # optimizer steps: what the schedule, the EMA and the logs count
    precision = resolve_precision(t["precision"], device)
    return Job(backbone, fold, seed, device, model, ema, optimizer, Schedule(cfg, optimizer, steps), criteria,
               batches, prepare, store, val_rows, data.table.iloc[val_rows], steps, model.heads, precision,
               grad_scaler(device, precision))


def _criteria(cfg: dict, data: TrainData, train_rows: np.ndarray, model_heads: tuple) -> dict:
    """{head: (the batch target it reads, its loss)}: the configured loss on the labels (a pseudo-labelled image's
    unknown head, -1, adds nothing), or for a student (distill.teacher) the cross-entropy to the teacher's
    probabilities, unweighted: the teacher's probabilities already carry its view of the rare classes."""
    t = cfg["train"]
    heads = labels.trained_heads(cfg["model"]["head"], model_heads)
    if data.soft_targets is not None:
        return {head: (f"soft_{head}", soft_loss) for head in heads}
    return {head: (head, loss_fn(t["loss"], _head_class_weights(cfg, data.train_targets[head][train_rows], head),
                                 t["label_smoothing"], t["focal_gamma"])) for head in heads}


def _head_class_weights(cfg: dict, head_targets: np.ndarray, head: str):
    if not cfg["train"]["class_weights"]:
        return None
    return class_weights(head_targets[head_targets >= 0], labels.SIZES[head])


def set_frozen(job: Job, frozen: bool) -> None:
    """Freeze or unfreeze the backbone's weights (its BatchNorm statistics: see train_one_epoch)."""
    for parameter in job.model.backbone.parameters():
        parameter.requires_grad_(not frozen)


def _backward(cfg: dict, job: Job, images: torch.Tensor, targets: dict, parts: int) -> dict:
    """Forward and backward of one batch, its loss divided by `parts` (the batches summed into one optimizer step),
    the gradients added to what is there; the per-head losses (undivided) as device tensors, never read here."""
    with autocast(job.device, job.precision):
        outputs = labels.split_logits(job.model(images), cfg["model"]["head"], job.heads)
    losses = {head: criterion(outputs[head], targets[key]) for head, (key, criterion) in job.criteria.items()}
    loss = sum(cfg["model"]["head_weights"].get(head, 1.0) * value for head, value in losses.items()) / parts
    (loss if job.scaler is None else job.scaler.scale(loss)).backward()
    return losses


def _optimizer_step(cfg: dict, job: Job, step: int) -> torch.Tensor | None:
    """Optimizer step number `step` on the gradients summed so far, then the EMA; whether it was taken, as a device
    tensor: None where every step is (bf16, fp32); under fp16 False for a step whose gradients were not finite,
    which GradScaler skips (the weights stay as they were) and the loop counts. train.clip_grad clips the true
    gradients' norm (unscaled first under fp16)."""
    clip, taken = cfg["train"]["clip_grad"], None
    if job.scaler is None:
        if clip:
            torch.nn.utils.clip_grad_norm_(job.model.parameters(), clip)
        job.optimizer.step()
    else:
        job.scaler.unscale_(job.optimizer)
        trained = [p for p in job.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in trained])  # on the device: no sync
        if clip:
            torch.nn.utils.clip_grads_with_norm_(trained, clip, norm)  # takes the parameters, reads their .grad
        taken = torch.isfinite(norm)  # what GradScaler's own check finds: one non-finite gradient makes the norm so
        job.scaler.step(job.optimizer)
        job.scaler.update()
    if job.ema is not None:
        job.ema.update(job.model, step=step)
    return taken


def _step(cfg: dict, job: Job, images: torch.Tensor, targets: dict, step: int) -> tuple[dict, torch.Tensor | None]:
    """Optimizer step number `step` on one batch: (its per-head losses, whether the step was taken)."""
    job.schedule.set(step)
    job.optimizer.zero_grad(set_to_none=True)
    losses = _backward(cfg, job, images, targets, 1)
    return losses, _optimizer_step(cfg, job, step)


class InputClock:
    """Where an epoch's time goes: each step's input side (from the previous step's end until its batch is model
    input: waiting for the loader, the copy, the kornia engine's augmentation, CutMix) against the step itself.
    On CUDA it reads events recorded on the stream, once, at the epoch's end (the epoch's one sync): the host only
    queues work there, so a host clock would time kernel launches, about 0. Elsewhere the host's clock is the
    device's."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.mark()

    def mark(self) -> None:
        """At the start, then alternately: this step's input ready, this step done."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def input_share(self) -> float:
        if self.cuda:
            self.marks[-1].synchronize()
            spans = [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        else:
            spans = [b - a for a, b in zip(self.marks, self.marks[1:])]
        return sum(spans[0::2]) / max(sum(spans), 1e-9)


def _refuse_layout(job: Job, images: torch.Tensor, epoch: int) -> None:
    """A batch that is not channels_last where the model is would be converted inside every convolution."""
    if job.prepare.channels_last and not images.is_contiguous(memory_format=torch.channels_last):
        raise RuntimeError(f"{job.backbone} fold {job.fold} epoch {epoch}: the training batch is not channels_last "
                           f"after augmentation (strides {images.stride()})")


def _refuse_divergence(job: Job, epoch: int, values: dict, what: str) -> None:
    """A NaN or infinite loss or probability: the weights are lost, and every later epoch would only pretend."""
    bad = ", ".join(f"{name} {value}" for name, value in values.items() if not math.isfinite(value))
    if bad:
        raise FloatingPointError(f"{job.backbone} fold {job.fold} epoch {epoch}: {what} not finite ({bad}): the "
                                 f"training diverged (a lower train.lr, train.clip_grad, or train.precision: fp32, "
                                 f"may help)")


def train_one_epoch(cfg: dict, job: Job, epoch: int) -> dict:
    """One pass over the epoch's draws: mean loss per head, images per second and the share of the epoch the
    steps spent on their input (data_wait, see InputClock), and the steps fp16 skipped (skipped_steps: gradients not
    finite; their losses stay out of the means). Loss sums stay on the device; the host reads them, and so waits
    for the GPU to catch up, only every PROGRESS_EVERY steps (the progress bar) and at the end. The loader can
    still make the GPU wait for input: data_wait says how much. A mean loss that is not finite, or an epoch whose
    every step was skipped, stops the job."""
    t = cfg["train"]
    epoch_seed = job.seed * 1000 + epoch
    _reseed(epoch_seed)  # dropout and the kornia engine's parameters draw from torch's global generators
    coin = torch.Generator().manual_seed(epoch_seed)
    mix = torch.Generator(device=job.device).manual_seed(epoch_seed)
    frozen = job.frozen(epoch)
    set_frozen(job, frozen)
    job.model.train()
    if frozen:
        job.model.backbone.eval()  # BatchNorm running statistics stay the pretrained ones
    parts = t["accumulate"]
    steps = min(job.steps_per_epoch, max((t["max_batches"] or len(job.batches)) // parts, 1))
    batches = steps * parts  # the batches drawn: whole groups of `parts` per optimizer step
    loss_sum = {head: torch.zeros((), device=job.device) for head in job.criteria}
    counted, skipped = torch.zeros((), device=job.device), torch.zeros((), dtype=torch.long, device=job.device)
    group = {head: torch.zeros((), device=job.device) for head in job.criteria}
    started, seen, in_group = time.perf_counter(), 0, 0
    clock = InputClock(job.device)
    bar = progress(total=batches, desc=f"{job.backbone} f{job.fold} e{epoch}", unit="batch", leave=False)
    for draw, (images, targets) in enumerate(job.batches.epoch(epoch_seed)):
        if draw >= batches:
            break
        step, part = epoch * job.steps_per_epoch + draw // parts, draw % parts
        images = job.prepare(images)
        if t["cutmix_p"] and float(torch.rand(1, generator=coin)) < t["cutmix_p"]:
            images = same_label_cutmix(images, targets["group"], mix)
        _refuse_layout(job, images, epoch)
        clock.mark()
        if part == 0:
            job.schedule.set(step)
            job.optimizer.zero_grad(set_to_none=True)
        losses = _backward(cfg, job, images, targets, parts)
        taken = _optimizer_step(cfg, job, step) if part == parts - 1 else None
        clock.mark()
        seen += len(images)
        in_group += len(images)
        for head, value in losses.items():
            group[head] = group[head] + value.detach() * len(images)
        if part == parts - 1:  # the optimizer step's losses count once it is known whether fp16 took it
            for head, total in group.items():
                loss_sum[head] += total if taken is None else torch.where(taken, total, 0.0)
            counted += in_group if taken is None else taken * in_group
            if taken is not None:
                skipped += ~taken
            group = {head: torch.zeros((), device=job.device) for head in job.criteria}
            in_group = 0
        bar.update()
        if draw % PROGRESS_EVERY == 0:
            bar.set_postfix(loss=f"{sum(float(v) for v in loss_sum.values()) / max(float(counted), 1):.3f}")
    bar.close()
    images_counted, skipped = float(counted), int(skipped)  # the epoch's sync
    elapsed = max(time.perf_counter() - started, 1e-9)
    if skipped and skipped >= steps:
        raise FloatingPointError(f"{job.backbone} fold {job.fold} epoch {epoch}: every one of its {steps} steps was "
                                 f"skipped under fp16 (gradients not finite): the training diverged (a lower train.lr, "
                                 f"train.clip_grad, or train.precision: fp32, may help)")
    means = {f"loss_{head}": float(total) / max(images_counted, 1) for head, total in loss_sum.items()}
    _refuse_divergence(job, epoch, means, "mean training loss")
    return {"images_per_s": seen / elapsed, "data_wait": clock.input_share(), "skipped_steps": skipped, **means}


def validate(cfg: dict, job: Job) -> tuple[dict, dict]:
    """Validation probabilities (no augmentation) and their scores against the official labels."""
    probs = predict(job.eval_model, job.store, job.val_rows, eval_normalize(cfg, job.device), cfg["infer"]["batch_size"],
                    precision=job.precision, desc="validate")
    return probs, score_probs(probs, job.val_table["label"].to_numpy())


def _log_epoch(artifact: Artifact, run_log: RunLog, state: LoopState, record: dict, improved: bool, job: Job) -> None:
    atomic_write_text(artifact.path(METRICS), "".join(json.dumps(r) + "\n" for r in state.history))
    run_log.log(record)
    heads = " ".join(f"{h} {record[f'val_f1_{h}']:.3f}" for h in labels.HEADS if f"val_f1_{h}" in record)
    print(f"[train] {job.backbone} fold {job.fold} epoch {record['epoch']}: val F1 {record['val_f1']:.4f} "
          f"({heads}) {record['images_per_s']:.0f} img/s{_skipped_text(record, job)}{'  *best' if improved else ''}")


def _skipped_text(record: dict, job: Job) -> str:
    skipped = record.get("skipped_steps", 0)
    return f", {skipped} of {job.steps_per_epoch} steps skipped (fp16: gradients not finite)" if skipped else ""


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
    saved = checkpoint.resume(artifact, job)
    state = LoopState(**saved) if saved else LoopState()
    if saved:
        print(f"[train] {backbone} fold {fold}: resuming from {artifact.path(LAST)} at epoch {state.epoch}")
    write_provenance(artifact.folder, cfg, job.seed, {"job_key": artifact.key, "data_fingerprint": data.fingerprint,
                                                      "backbone": backbone, "fold": fold})
    with RunLog(cfg, artifact, backbone, fold, state.epoch, state) as run_log:
        while not state.finished(cfg["train"]["epochs"], cfg["train"]["patience"]):
            record = _epoch(cfg, job, artifact, state)
            _log_epoch(artifact, run_log, state, record, record["epoch"] == state.best_epoch, job)
            if epoch_callback is not None:
                epoch_callback(record["epoch"], record)
    return artifact.seal(backbone=backbone, fold=fold, best_epoch=state.best_epoch, best_f1=state.best_f1,
                         epochs_run=state.epoch, seed=job.seed, data_fingerprint=data.fingerprint,
                         precision=job.precision, history=state.history)


def _epoch(cfg: dict, job: Job, artifact: Artifact, state: LoopState) -> dict:
    """Train one epoch, validate, step the schedule, then checkpoint: best.pt and its validation table when
    the F1 improved, and last.pt every train.checkpoint_every epochs and after the last one, after which a kill
    resumes from the next epoch. last.pt (model, EMA and optimizer, digested and fsynced) can cost a small
    model's epoch on a GPU."""
    epoch = state.epoch
    first = epoch * job.steps_per_epoch
    record = {"epoch": epoch, "lr": job.schedule.value(first), "lr_backbone": job.schedule.value(first, backbone=True)
              * cfg["train"]["backbone_lr_mult"], "frozen": int(job.frozen(epoch)),
              **train_one_epoch(cfg, job, epoch)}
    val_probs, scores = validate(cfg, job)
    _refuse_divergence(job, epoch, {key: float(table.sum()) for key, table in val_probs.items()},
                       "validation probabilities")
    record.update({f"val_{k}": v for k, v in scores.items()})
    job.schedule.observe(scores["f1"])
    if state.improve(epoch, scores["f1"]):
        checkpoint.save_best(artifact, job.eval_model, job.backbone, job.fold, epoch, scores["f1"])
        save_probs(artifact.path(VAL_PROBS), job.val_table, val_probs, backbone=job.backbone, fold=job.fold)
    state.history.append(record)
    state.epoch = epoch + 1
    t = cfg["train"]
    if state.epoch % t["checkpoint_every"] == 0 or state.finished(t["epochs"], t["patience"]):
        checkpoint.save_last(artifact, job, asdict(state))
    return record
