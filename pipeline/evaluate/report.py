"""The out-of-fold report: scores per backbone, head, fold and class; confusion and per-class plots; markdown.

The score is the pooled OOF macro F1 over 18 classes, not the mean of fold scores.
"""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np
from sklearn.metrics import confusion_matrix

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from pipeline import labels
from pipeline.artifacts import safe_name
from pipeline.evaluate.metrics import macro_f1, per_class_f1, score_probs
from pipeline.evaluate.tables import probs_of
from pipeline.io import atomic_write_bytes


def class_names() -> list[str]:
    names = []
    for c in range(labels.NUM_CLASSES):
        mask, gender, age = labels.decompose(c)
        names.append(f"{c} {labels.MASK_NAMES[mask]}/{labels.GENDER_NAMES[gender]}/{labels.AGE_NAMES[age]}")
    return names


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

