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
    probs = probs_of(pooled)
    scores = score_probs(probs, label)
    if "joint" not in probs:  # a per-task model (model.tasks): its heads' scores; its f1 is their mean
        per_fold = {int(f): score_probs({k: v[folds == f] for k, v in probs.items()}, label[folds == f])["f1"]
                    for f in np.unique(folds)}
        return {**scores, "heads": list(probs), "per_fold_f1": per_fold,
                "mean_fold_f1": float(np.mean(list(per_fold.values()))), "images": int(len(label))}
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
    for i, (backbone, report) in enumerate((b, r) for b, r in reports.items() if "per_class_f1" in r):
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
        heads = " | ".join(f"{r[f'f1_{h}']:.4f}" if f"f1_{h}" in r else "-" for h in labels.HEADS)
        mark = "" if "per_class_f1" in r else "*"
        lines.append(f"| {backbone} | {r['f1']:.4f}{mark} | {heads} | {r['mean_fold_f1']:.4f} | {folds} |")
    full = {b: r for b, r in reports.items() if "per_class_f1" in r}
    if len(full) < len(reports):
        lines += ["", "\\* a per-task model (model.tasks): the mean macro F1 of the heads it predicts"]
    if full:
        lines += ["", "## Per-class F1", "", "| class | support | " + " | ".join(full) + " |",
                  "|---|---|" + "---|" * len(full)]
        first = next(iter(full.values()))
        for c, name in enumerate(class_names()):
            lines.append(f"| {name} | {first['support'][c]} | "
                         + " | ".join(f"{r['per_class_f1'][c]:.3f}" for r in full.values()) + " |")
        lines += ["", "![per-class F1](per_class_f1.png)", ""]
        lines += [f"![confusion {b}](confusion_{safe_name(b)}.png)" for b in full]
    return "\n".join(lines) + "\n"

