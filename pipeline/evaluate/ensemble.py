"""Soft-voting math on probability tables: weighted combination, weights fitted on OOF only, the submission check."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from pipeline import labels
from pipeline.errors import MaskfoldError
from pipeline.evaluate.metrics import score_probs


def combine(members: list[dict], weights, mode: str = "joint") -> dict[str, np.ndarray]:
    """Weighted soft vote. joint: average 18-class tables; heads: average each head, then multiply."""
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum()
    if mode == "joint":
        joint = sum(w * m["joint"].astype(np.float64) for w, m in zip(weights, members))
        return {**labels.heads_from_joint(joint), "joint": joint}
    heads = {h: sum(w * m[h].astype(np.float64) for w, m in zip(weights, members)) for h in labels.HEADS}
    return {**heads, "joint": labels.joint_from_heads(heads["mask"], heads["gender"], heads["age"])}


def simplex_grid(members: int, step: float):
    ticks = int(round(1 / step))
    for combo in itertools.product(range(ticks + 1), repeat=members - 1):
        if sum(combo) <= ticks:
            yield np.array([*combo, ticks - sum(combo)], dtype=np.float64) / ticks


def fit_weights(oof_members: list[dict], label: np.ndarray, step: float, mode: str) -> np.ndarray:
    """Backbone weights maximising pooled OOF macro F1 over a simplex grid. Sees OOF only, by signature."""
    best = np.full(len(oof_members), 1 / len(oof_members))
    best_f1 = score_probs(combine(oof_members, best, mode), label)["f1"]  # equal weights win ties
    if len(oof_members) == 1:
        return best
    for weights in simplex_grid(len(oof_members), step):
        f1 = score_probs(combine(oof_members, weights, mode), label)["f1"]
        if f1 > best_f1 + 1e-12:
            best, best_f1 = weights, f1
    return best


def check_submission(submission: pd.DataFrame, info: pd.DataFrame) -> None:
    problems = []
    if list(submission.columns) != ["ImageID", "ans"]:
        problems.append(f"columns {list(submission.columns)} are not ['ImageID', 'ans']")
    if len(submission) != len(info) or not (submission["ImageID"].to_numpy() == info["ImageID"].to_numpy()).all():
        problems.append("ImageIDs are not info.csv's, in info.csv's order")
    if submission["ImageID"].duplicated().any():
        problems.append("some ImageID appears twice")
    ans = submission["ans"]
    if not pd.api.types.is_integer_dtype(ans) or ans.min() < 0 or ans.max() >= labels.NUM_CLASSES:
        problems.append(f"ans must be integers 0..{labels.NUM_CLASSES - 1}")
    if problems:
        raise MaskfoldError("submission failed its checks: " + "; ".join(problems))


def backbone_weights(oof_members: list[dict], label: np.ndarray, ensemble_cfg: dict) -> np.ndarray:
    """ensemble.weights: 'equal', or 'fit' on the OOF tables (ensemble.weight_step, ensemble.combine)."""
    if ensemble_cfg["weights"] == "equal":
        return np.full(len(oof_members), 1 / len(oof_members))
    return fit_weights(oof_members, label, ensemble_cfg["weight_step"], ensemble_cfg["combine"])


def nested_weights_f1(oof_members: list[dict], label: np.ndarray, fold: np.ndarray,
                      ensemble_cfg: dict) -> float | None:
    """Macro F1 of the ensemble with its backbone weights fitted on all folds but one and scored on that one,
    pooled: the honest estimate beside the weights fitted and scored on the whole OOF (None under 2 folds)."""
    if len(np.unique(fold)) < 2:
        return None
    joint = np.zeros((len(label), labels.NUM_CLASSES))
    for f in np.unique(fold):
        held = fold == f
        weights = backbone_weights([{k: v[~held] for k, v in m.items()} for m in oof_members], label[~held], ensemble_cfg)
        joint[held] = combine([{k: v[held] for k, v in m.items()} for m in oof_members], weights,
                              ensemble_cfg["combine"])["joint"]
    return float(score_probs({"joint": joint, **labels.heads_from_joint(joint)}, label)["f1"])


def submission_frame(info: pd.DataFrame, joint: np.ndarray, offsets=None) -> pd.DataFrame:
    """info.csv with `ans` filled by the decision rule (the argmax, or with ensemble.decision: offsets the
    argmax of log-probabilities plus the fitted per-class offsets), checked before anyone writes it."""
    from pipeline.evaluate.decision import decide

    submission = pd.DataFrame({"ImageID": info["ImageID"], "ans": decide(joint, offsets).astype(np.int64)})
    check_submission(submission, info)
    return submission
