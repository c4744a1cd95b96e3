"""Scores: scikit-learn's macro F1 over fixed label sets (zero_division=0), overall and per head."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score

from pipeline import labels


def macro_f1(y_true, y_pred, num_classes: int = labels.NUM_CLASSES) -> float:
    return float(f1_score(y_true, y_pred, labels=list(range(num_classes)), average="macro", zero_division=0))


def per_class_f1(y_true, y_pred, num_classes: int = labels.NUM_CLASSES) -> np.ndarray:
    return f1_score(y_true, y_pred, labels=list(range(num_classes)), average=None, zero_division=0)


def score_probs(probs: dict[str, np.ndarray], label: np.ndarray) -> dict[str, float]:
    """Macro F1 of the 18-class argmax, and of each head's argmax against the official labels.

    A per-task model (model.tasks) has no joint: its `f1`, what its early stopping follows, is the mean
    macro F1 of its heads, and `f1_<head>` is there for its heads only."""
    mask, gender, age = labels.decompose(np.asarray(label))
    truth = {"mask": mask, "gender": gender, "age": age}
    scores = {f"f1_{head}": macro_f1(truth[head], probs[head].argmax(1), size)
              for head, size in labels.HEADS.items() if head in probs}
    scores = {"f1": macro_f1(label, probs["joint"].argmax(1)) if "joint" in probs else float(np.mean(list(scores.values()))),
              **scores}
    return scores
