"""Soft-voting math on probability tables: weighted combination, weights fitted on OOF only, the submission check."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from pipeline import labels
from pipeline.errors import MaskfoldError
from pipeline.evaluate.metrics import macro_f1, score_probs


def combine(members: list[dict], weights, mode: str = "joint") -> dict[str, np.ndarray]:
    """Weighted soft vote. joint: average 18-class tables; heads: average each head over the members that predict
    it, then multiply. `weights`: one per member, or (heads) one per member for each head {head: [...]}; a member
    without a head (a per-task model, model.tasks) has no vote there."""
    if mode == "joint":
        weights = np.asarray(weights, dtype=np.float64)
        weights = weights / weights.sum()
        joint = sum(w * m["joint"].astype(np.float64) for w, m in zip(weights, members))
        return {**labels.heads_from_joint(joint), "joint": joint}
    heads = {}
    for head in labels.HEADS:
        w = np.asarray(weights[head] if isinstance(weights, dict) else weights, dtype=np.float64)
        w = np.where([head in m for m in members], w, 0.0)
        if w.sum() <= 0:
            raise MaskfoldError(f"ensemble: no member with a weight above 0 predicts the {head} head")
        heads[head] = sum(wi / w.sum() * m[head].astype(np.float64) for wi, m in zip(w, members) if wi > 0)
    return {**heads, "joint": labels.joint_from_heads(heads["mask"], heads["gender"], heads["age"])}


def weights_by_backbone(weights, backbones: list[str], members: list[dict]) -> dict:
    """The weights as ensemble.json holds them: {backbone: weight}, or per head {backbone: {head: weight}} for
    the heads each backbone predicts (combine: heads)."""
    if not isinstance(weights, dict):
        return {b: float(w) for b, w in zip(backbones, weights)}
    return {b: {h: float(weights[h][i]) for h in labels.HEADS if h in members[i]} for i, b in enumerate(backbones)}


def weight_text(weight) -> str:
    """One member's weight as the ensemble stage and the summary print it: 0.50, or per head 'mask 0.50 age 1.00'."""
    if isinstance(weight, dict):
        return " ".join(f"{head} {value:.2f}" for head, value in weight.items())
    return f"{weight:.2f}"


def head_members(members: list[dict], head: str) -> list[int]:
    """The members that predict `head`."""
    return [i for i, m in enumerate(members) if head in m]


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


def fit_head_weights(oof_members: list[dict], label: np.ndarray, step: float) -> dict[str, np.ndarray]:
    """combine: heads: per head, the weights of the members predicting it that maximise that head's pooled OOF
    macro F1 (a simplex grid, as fit_weights; 0 for the others). One head's weights do not move another's
    probabilities, so each is fitted alone: three small searches, not one over every member per head."""
    truth = dict(zip(labels.HEADS, labels.decompose(np.asarray(label))))
    weights = {}
    for head, size in labels.HEADS.items():
        have = head_members(oof_members, head)
        tables = [oof_members[i][head].astype(np.float64) for i in have]
        best, best_f1 = np.full(len(have), 1 / len(have)), -1.0
        grid = [best] + (list(simplex_grid(len(have), step)) if len(have) > 1 else [])
        for w in grid:  # equal weights first: they win ties
            f1 = macro_f1(truth[head], sum(wi * t for wi, t in zip(w, tables)).argmax(1), size)
            if f1 > best_f1 + 1e-12:
                best, best_f1 = w, f1
        weights[head] = np.zeros(len(oof_members))
        weights[head][have] = best
    return weights


def backbone_weights(oof_members: list[dict], label: np.ndarray, ensemble_cfg: dict):
    """ensemble.weights: 'equal', or 'fit' on the OOF tables (ensemble.weight_step, ensemble.combine). With
    combine: heads, one set per head {head: weights} (a member without the head weighs 0 there)."""
    heads = ensemble_cfg["combine"] == "heads"
    if ensemble_cfg["weights"] == "equal":
        if not heads:
            return np.full(len(oof_members), 1 / len(oof_members))
        return {h: np.array([1.0 / len(head_members(oof_members, h)) if h in m else 0.0 for m in oof_members])
                for h in labels.HEADS}
    if heads:
        return fit_head_weights(oof_members, label, ensemble_cfg["weight_step"])
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
