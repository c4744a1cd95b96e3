"""infer stage: every (backbone, fold) best checkpoint predicts the eval images with TTA.

The same TTA is applied to that fold's validation images, so the ensemble can measure TTA on OOF.
Writes <output.dir>/infer/<backbone>/fold<k>/eval_probs.npz and val_probs_tta.npz.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.augment import eval_transform
from pipeline.config import stage_main
from pipeline.data import ImageDataset, cached_images, load_eval
from pipeline.io import atomic_save_npz, atomic_write_json, git_commit, stable_hash, torch_load, write_provenance
from pipeline.jobs import MissingCheckpointError, infer_dir, job_dir, job_hash, job_list, save_probs
from pipeline.models import build_model, predict
from pipeline.train import TrainData, load_train_data, resolve_device


def load_best(cfg: dict, backbone: str, fold: int, expected_hash: str):
    path = job_dir(cfg, backbone, fold) / "best.pt"
    if not path.exists():
        raise MissingCheckpointError(f"{backbone} fold {fold}: checkpoint {path} is missing; train it first "
                                     f"(python -m pipeline.train -c CONFIG model.backbones=[{backbone}] "
                                     f"train.folds=[{fold}])")
    checkpoint = torch_load(path)
    if checkpoint.get("job_hash") != expected_hash:
        raise RuntimeError(f"{path} was trained under a different config (hash {checkpoint.get('job_hash')}, "
                           f"now {expected_hash}); retrain it or point output.dir at the matching run")
    model = build_model(cfg, backbone, for_inference=True)
    model.load_state_dict(checkpoint["model"])
    return model


def infer_job(cfg: dict, backbone: str, fold: int, data: TrainData, eval_table, eval_images,
              force: bool = False) -> Path:
    folder = infer_dir(cfg, backbone, fold)
    tta = list(cfg["infer"]["tta"])
    this_hash = job_hash(cfg, backbone, data.fingerprint)
    identity = stable_hash({"job_hash": this_hash, "tta": tta, "eval": eval_table["ImageID"].tolist()})
    done = folder / "infer.json"
    if done.exists() and not force and json.loads(done.read_text()).get("identity") == identity:
        print(f"[infer] {backbone} fold {fold}: up to date; skipping (--force to redo)")
        return folder
    model = load_best(cfg, backbone, fold, this_hash)
    device = resolve_device(cfg["train"]["device"])
    model.to(device)
    batch, amp = cfg["infer"]["batch_size"], cfg["train"]["amp"]
    transform = eval_transform(cfg)
    val_rows = np.flatnonzero(data.fold == fold)
    val_probs = predict(model, ImageDataset(data.images, None, transform, rows=val_rows), device, batch, tta, amp,
                        desc=f"{backbone} f{fold} val TTA")
    save_probs(folder / "val_probs_tta.npz", data.table.iloc[val_rows], val_probs, backbone=backbone, fold=fold)
    eval_probs = predict(model, ImageDataset(eval_images, None, transform), device, batch, tta, amp,
                         desc=f"{backbone} f{fold} eval")
    atomic_save_npz(folder / "eval_probs.npz", image_id=eval_table["ImageID"].to_numpy().astype(str),
                    **{f"probs_{k}": v for k, v in eval_probs.items()}, backbone=np.asarray(backbone),
                    fold=np.asarray(fold))
    write_provenance(folder, cfg, cfg["train"]["seed"],
                     {"job_hash": this_hash, "tta": tta, "data_fingerprint": data.fingerprint})
    atomic_write_json(done, {"identity": identity, "tta": tta, "git_commit": git_commit()})
    print(f"[infer] {backbone} fold {fold}: {len(eval_table)} eval images, {len(val_rows)} val images, TTA {tta}")
    return folder


def run(cfg: dict, force: bool = False) -> list[Path]:
    data = load_train_data(cfg)
    jobs = job_list(cfg)
    # every checkpoint must be there before any work starts: fail fast, naming each missing one
    missing = [str(job_dir(cfg, b, f) / "best.pt") for b, f in jobs if not (job_dir(cfg, b, f) / "best.pt").exists()]
    if missing:
        raise MissingCheckpointError(f"missing fold checkpoint(s): {', '.join(missing)}; run the train stage first")
    eval_table, _ = load_eval(cfg)
    eval_images = cached_images(cfg, eval_table["file"], desc="decode eval")
    return [infer_job(cfg, backbone, fold, data, eval_table, eval_images, force) for backbone, fold in jobs]


if __name__ == "__main__":
    stage_main(run, "Predict eval (and validation) images with TTA for every fold checkpoint")
