"""oof stage: pool every fold's validation probabilities into one out-of-fold table per backbone.

Each image is predicted by the one model that never saw it. The score is the pooled OOF macro F1
(not the mean of fold scores). Writes <output.dir>/oof/: report.md, report.json, confusion-matrix
and per-class PNGs, and <backbone>.npz (the OOF probability table).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib
import numpy as np
from sklearn.metrics import confusion_matrix

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from pipeline import labels
from pipeline.config import output_dir, stage_main
from pipeline.data import data_fingerprint, load_train
from pipeline.io import atomic_save_npz, atomic_write_bytes, atomic_write_json, atomic_write_text, git_commit, load_npz
from pipeline.jobs import job_dir, job_hash
from pipeline.metrics import macro_f1, per_class_f1, score_probs

PROB_KEYS = ("probs_mask", "probs_gender", "probs_age", "probs_joint")


class IncompleteFoldsError(RuntimeError):
    pass


def class_names() -> list[str]:
    names = []
    for c in range(labels.NUM_CLASSES):
        mask, gender, age = labels.decompose(c)
        names.append(f"{c} {labels.MASK_NAMES[mask]}/{labels.GENDER_NAMES[gender]}/{labels.AGE_NAMES[age]}")
    return names


def pool_backbone(cfg: dict, backbone: str, fingerprint: str, name: str = "val_probs.npz",
                  root_of=job_dir) -> dict[str, np.ndarray]:
    """Concatenate one backbone's K fold tables; refuse if any fold is missing or stale."""
    k = cfg["folds"]["k"]
    expected_hash = job_hash(cfg, backbone, fingerprint)
    missing, stale, parts = [], [], []
    for fold in range(k):
        path = root_of(cfg, backbone, fold) / name
        done = job_dir(cfg, backbone, fold) / "done.json"
        if not path.exists() or not done.exists():
            missing.append(f"fold {fold} ({path if not path.exists() else done})")
            continue
        if json.loads(done.read_text()).get("job_hash") != expected_hash:
            stale.append(f"fold {fold} ({done})")
            continue
        table = load_npz(path)
        table["fold"] = np.full(len(table["image_id"]), fold)
        parts.append(table)
    if missing:
        raise IncompleteFoldsError(f"backbone {backbone}: {len(missing)} of {k} folds incomplete, refusing to pool: "
                                   + "; ".join(missing) + ". Train them: python -m pipeline.train -c CONFIG "
                                   f"model.backbones=[{backbone}] train.folds=[...]")
    if stale:
        raise IncompleteFoldsError(f"backbone {backbone}: folds trained under a different config: " + "; ".join(stale))
    pooled = {key: np.concatenate([p[key] for p in parts]) for key in ("image_id", "label", "fold", *PROB_KEYS)}
    order = np.argsort(pooled["image_id"], kind="stable")
    return {key: value[order] for key, value in pooled.items()}


def check_coverage(pooled: dict, table, backbone: str) -> None:
    ids = pooled["image_id"]
    if len(np.unique(ids)) != len(ids):
        raise IncompleteFoldsError(f"backbone {backbone}: some images are predicted by more than one fold")
    if set(ids) != set(table["image_id"]):
        raise IncompleteFoldsError(f"backbone {backbone}: OOF covers {len(ids)} images, data has {len(table)}")


def probs_of(pooled: dict) -> dict[str, np.ndarray]:
    return {key.removeprefix("probs_"): pooled[key] for key in PROB_KEYS}


def backbone_report(pooled: dict) -> dict:
    label, folds = pooled["label"], pooled["fold"]
    scores = score_probs(probs_of(pooled), label)
    pred = pooled["probs_joint"].argmax(1)
    per_fold = {int(f): macro_f1(label[folds == f], pred[folds == f]) for f in np.unique(folds)}
    return {**scores, "per_fold_f1": per_fold, "mean_fold_f1": float(np.mean(list(per_fold.values()))),
            "per_class_f1": per_class_f1(label, pred).round(4).tolist(),
            "support": np.bincount(label, minlength=labels.NUM_CLASSES).tolist(), "images": int(len(label))}


def plot_confusion(label, pred, title: str, path: Path) -> None:
    matrix = confusion_matrix(label, pred, labels=list(range(labels.NUM_CLASSES)))
    rows = matrix.sum(1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(9, 8))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(labels.NUM_CLASSES):
        for j in range(labels.NUM_CLASSES):
            if matrix[i, j]:
                ax.text(j, i, matrix[i, j], ha="center", va="center", fontsize=6,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(labels.NUM_CLASSES))
    ax.set_yticks(range(labels.NUM_CLASSES))
    ax.set_yticklabels(class_names(), fontsize=6)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_per_class(reports: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(1, len(reports))
    for i, (backbone, report) in enumerate(reports.items()):
        ax.bar(np.arange(labels.NUM_CLASSES) + i * width, report["per_class_f1"], width, label=backbone)
    ax.set_xticks(np.arange(labels.NUM_CLASSES) + 0.4 - width / 2)
    ax.set_xticklabels(range(labels.NUM_CLASSES))
    ax.set_xlabel("class")
    ax.set_ylabel("OOF F1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def markdown(reports: dict) -> str:
    lines = ["# Out-of-fold report", "", "Pooled OOF macro F1 over 18 classes (each image predicted by the fold model "
             "that never saw it).", "", "| backbone | OOF F1 | mask F1 | gender F1 | age F1 | mean of fold F1s | "
             "per fold |", "|---|---|---|---|---|---|---|"]
    for backbone, r in reports.items():
        folds = " ".join(f"{v:.3f}" for v in r["per_fold_f1"].values())
        lines.append(f"| {backbone} | {r['f1']:.4f} | {r['f1_mask']:.4f} | {r['f1_gender']:.4f} | {r['f1_age']:.4f} "
                     f"| {r['mean_fold_f1']:.4f} | {folds} |")
    lines += ["", "## Per-class F1", "", "| class | support | " + " | ".join(reports) + " |",
              "|---|---|" + "---|" * len(reports)]
    first = next(iter(reports.values()))
    for c, name in enumerate(class_names()):
        lines.append(f"| {name} | {first['support'][c]} | "
                     + " | ".join(f"{r['per_class_f1'][c]:.3f}" for r in reports.values()) + " |")
    lines += ["", "![per-class F1](per_class_f1.png)", ""]
    lines += [f"![confusion {b}](confusion_{safe_name(b)}.png)" for b in reports]
    return "\n".join(lines) + "\n"


def safe_name(backbone: str) -> str:
    return backbone.replace("/", "_")


def run(cfg: dict, force: bool = False) -> dict:
    table, _ = load_train(cfg)
    fingerprint = data_fingerprint(table)
    folder = output_dir(cfg, "oof")
    reports = {}
    for backbone in cfg["model"]["backbones"]:
        pooled = pool_backbone(cfg, backbone, fingerprint)
        check_coverage(pooled, table, backbone)
        atomic_save_npz(folder / f"{safe_name(backbone)}.npz", **pooled)
        reports[backbone] = backbone_report(pooled)
        plot_confusion(pooled["label"], pooled["probs_joint"].argmax(1), f"{backbone}: OOF confusion",
                       folder / f"confusion_{safe_name(backbone)}.png")
    plot_per_class(reports, folder / "per_class_f1.png")
    atomic_write_json(folder / "report.json", {"backbones": reports, "data_fingerprint": fingerprint,
                                               "git_commit": git_commit(), "seed": cfg["train"]["seed"],
                                               "config": cfg})
    atomic_write_text(folder / "report.md", markdown(reports))
    for backbone, r in reports.items():
        print(f"[oof] {backbone}: pooled OOF macro F1 {r['f1']:.4f} (mask {r['f1_mask']:.3f}, gender "
              f"{r['f1_gender']:.3f}, age {r['f1_age']:.3f}); folds {list(r['per_fold_f1'].values())}")
    print(f"[oof] report: {folder / 'report.md'}")
    return reports


if __name__ == "__main__":
    stage_main(run, "Pool out-of-fold predictions and report macro F1")
