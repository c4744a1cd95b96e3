"""ensemble stage: soft voting across folds (mean) and across backbones (equal or OOF-fitted weights).

Reads only probabilities. Weights are fitted on OOF probabilities, never on eval. Writes
<output.dir>/submission.csv (ImageID, ans in info.csv's order, checked, atomic) and ensemble.json.
"""
from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd

from pipeline import labels
from pipeline.config import output_dir, stage_main
from pipeline.data import data_fingerprint, eval_csv, load_train, read_csv
from pipeline.io import atomic_write_json, atomic_write_text, git_commit, load_npz
from pipeline.jobs import MissingCheckpointError, infer_dir, job_dir
from pipeline.metrics import score_probs
from pipeline.oof import check_coverage, pool_backbone, probs_of

HEAD_KEYS = ("mask", "gender", "age")


def combine(members: list[dict], weights, mode: str = "joint") -> dict[str, np.ndarray]:
    """Weighted soft vote. joint: average 18-class tables; heads: average each head, then multiply."""
    if mode not in ("joint", "heads"):
        raise ValueError(f"ensemble.combine {mode!r} is not joint or heads")
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum()
    if mode == "joint":
        joint = sum(w * m["joint"].astype(np.float64) for w, m in zip(weights, members))
        return {**labels.heads_from_joint(joint), "joint": joint}
    heads = {h: sum(w * m[h].astype(np.float64) for w, m in zip(weights, members)) for h in HEAD_KEYS}
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


def fold_mean_eval(cfg: dict, backbone: str) -> tuple[np.ndarray, dict]:
    """Eval probabilities of one backbone: the mean over its K fold models."""
    tables = []
    for fold in range(cfg["folds"]["k"]):
        path = infer_dir(cfg, backbone, fold) / "eval_probs.npz"
        if not path.exists():
            raise MissingCheckpointError(f"{backbone} fold {fold}: {path} is missing; run the infer stage "
                                         f"(its checkpoint: {job_dir(cfg, backbone, fold) / 'best.pt'})")
        made_with = json.loads((path.parent / "infer.json").read_text()).get("tta")
        if made_with != list(cfg["infer"]["tta"]):
            raise RuntimeError(f"{path} was predicted with TTA {made_with}, the config now says "
                               f"{cfg['infer']['tta']}; rerun the infer stage")
        tables.append(load_npz(path))
    ids = tables[0]["image_id"]
    if any(not np.array_equal(t["image_id"], ids) for t in tables):
        raise RuntimeError(f"{backbone}: fold eval tables disagree on image order; rerun infer with --force")
    return ids, {k: np.mean([probs_of(t)[k] for t in tables], axis=0) for k in (*HEAD_KEYS, "joint")}


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
        raise RuntimeError("submission failed its checks: " + "; ".join(problems))


def run(cfg: dict, force: bool = False) -> dict:
    table, _ = load_train(cfg)
    fingerprint = data_fingerprint(table)
    backbones = list(cfg["model"]["backbones"])
    e = cfg["ensemble"]
    oof, oof_tta, evals, label = [], [], [], None
    for backbone in backbones:
        pooled = pool_backbone(cfg, backbone, fingerprint)
        check_coverage(pooled, table, backbone)
        pooled_tta = pool_backbone(cfg, backbone, fingerprint, "val_probs_tta.npz", root_of=infer_dir)
        check_coverage(pooled_tta, table, backbone)
        label = pooled["label"]
        oof.append(probs_of(pooled))
        oof_tta.append(probs_of(pooled_tta))
        ids, eval_probs = fold_mean_eval(cfg, backbone)
        evals.append(eval_probs)
    chosen = oof_tta if e["use_tta"] else oof
    if e["weights"] == "equal":
        weights = np.full(len(backbones), 1 / len(backbones))
    elif e["weights"] == "fit":
        weights = fit_weights(chosen, label, e["weight_step"], e["combine"])
    else:
        raise ValueError(f"ensemble.weights {e['weights']!r} is not equal or fit")

    members = {b: {"weight": float(w), "oof": score_probs(oof[i], label), "oof_tta": score_probs(oof_tta[i], label)}
               for i, (b, w) in enumerate(zip(backbones, weights))}
    ensemble_scores = {"oof": score_probs(combine(oof, weights, e["combine"]), label),
                       "oof_tta": score_probs(combine(oof_tta, weights, e["combine"]), label)}
    final = combine(evals, weights, e["combine"])

    info = read_csv(eval_csv(cfg["data"]["root"]), ("ImageID", "ans"))
    if not np.array_equal(ids, info["ImageID"].to_numpy().astype(str)):
        raise RuntimeError("eval probabilities do not match info.csv's ImageIDs; rerun infer with --force")
    submission = pd.DataFrame({"ImageID": info["ImageID"], "ans": final["joint"].argmax(1).astype(np.int64)})
    check_submission(submission, info)
    out = output_dir(cfg)
    atomic_write_text(out / "submission.csv", submission.to_csv(index=False, lineterminator="\n"))
    report = {"members": members, "weights": dict(zip(backbones, map(float, weights))), "combine": e["combine"],
              "weights_mode": e["weights"], "use_tta": e["use_tta"], "tta": cfg["infer"]["tta"],
              "ensemble": ensemble_scores, "submission": str(out / "submission.csv"),
              "predicted_class_counts": np.bincount(submission["ans"], minlength=labels.NUM_CLASSES).tolist(),
              "data_fingerprint": fingerprint, "git_commit": git_commit(), "seed": cfg["train"]["seed"],
              "config": cfg}
    atomic_write_json(out / "ensemble.json", report)
    for b, m in members.items():
        print(f"[ensemble] {b:<32} weight {m['weight']:.2f}  OOF F1 {m['oof']['f1']:.4f}  "
              f"with TTA {m['oof_tta']['f1']:.4f}")
    print(f"[ensemble] ensemble OOF F1 {ensemble_scores['oof']['f1']:.4f}, with TTA "
          f"{ensemble_scores['oof_tta']['f1']:.4f}; wrote {out / 'submission.csv'} ({len(submission)} rows)")
    return report


if __name__ == "__main__":
    stage_main(run, "Soft-vote folds and backbones into submission.csv")
