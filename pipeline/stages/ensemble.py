"""ensemble stage: soft-vote folds (mean) and backbones (equal or OOF-fitted weights) into submission.csv.

Reads only probability tables, each checked up to date against the current checkpoints (inference
tables made from older ones are refused, naming the infer stage). Writes <output.dir>/submission.csv
(info.csv's rows and order, checked), ensemble.json, and ensemble_probs.npz (the ensemble's probabilities of the
eval images and its OOF ones of the training images: what the pseudo stage and a student learn from).
"""
from __future__ import annotations

import numpy as np

from pipeline import labels
from pipeline.artifacts import EVAL_PROBS, VAL_PROBS_TTA, file_digest, output_dir
from pipeline.data.dataset import eval_identity, train_fingerprint
from pipeline.data.layout import load_eval, load_train
from pipeline.data.pseudo import ENSEMBLE_PROBS
from pipeline.evaluate.decision import nested_gain
from pipeline.evaluate.ensemble import (backbone_weights, combine, nested_weights_f1, submission_frame, weight_text,
                                        weights_by_backbone)
from pipeline.evaluate.metrics import score_probs
from pipeline.evaluate.tables import (ENSEMBLE_REPORT, check_coverage, ensemble_artifact, fresh_infer_artifacts,
                                      mean_of_folds, oof_table, pool_folds, probs_of)
from pipeline.io import atomic_save_npz, atomic_write_json, atomic_write_text, provenance
from pipeline.stages import stage_main


def run(cfg: dict, force: bool = False) -> dict:
    table, _ = load_train(cfg)
    fingerprint = train_fingerprint(cfg, table)
    info, _ = load_eval(cfg)
    eval_ids, eval_key = info["ImageID"].to_numpy().astype(str), eval_identity(cfg, info)
    backbones, e = list(cfg["model"]["backbones"]), cfg["ensemble"]
    oof, oof_tta, evals = [], [], []
    for backbone in backbones:
        pooled = oof_table(cfg, backbone, table, fingerprint)
        infer = fresh_infer_artifacts(cfg, backbone, fingerprint, eval_key)
        pooled_tta = pool_folds({fold: out.path(VAL_PROBS_TTA) for fold, out in infer.items()})
        check_coverage(pooled_tta, table["image_id"], f"backbone {backbone} (TTA)")
        oof.append(probs_of(pooled))
        oof_tta.append(probs_of(pooled_tta))
        evals.append(mean_of_folds({fold: out.path(EVAL_PROBS) for fold, out in infer.items()}, eval_ids, backbone))
    label, fold = pooled["label"], pooled["fold"]  # every pooled table is sorted by image id: rows align
    used = oof_tta if e["use_tta"] else oof
    weights = backbone_weights(used, label, e)
    shown = weights_by_backbone(weights, backbones, used)
    members = {b: {"weight": shown[b], "heads": [h for h in labels.HEADS if h in oof[i]],
                   "oof": score_probs(oof[i], label), "oof_tta": score_probs(oof_tta[i], label)}
               for i, b in enumerate(backbones)}
    scores = {"oof": score_probs(combine(oof, weights, e["combine"]), label),
              "oof_tta": score_probs(combine(oof_tta, weights, e["combine"]), label)}
    # honest estimates (fitted on all folds but one, scored on that one) beside the fitted ones
    scores["nested_weights_f1"] = nested_weights_f1(used, label, fold, e) if len(backbones) > 1 else None
    decision = {"rule": e["decision"], **nested_gain(combine(used, weights, e["combine"])["joint"], label, fold)}
    offsets = np.array(decision["offsets"]) if e["decision"] == "offsets" else None
    voted = combine(evals, weights, e["combine"])
    submission = submission_frame(info[["ImageID", "ans"]], voted["joint"], offsets)
    out = output_dir(cfg)
    # a teacher's tables, for pseudo-labels (pseudo stage) and a student (distill.teacher): the ensemble's
    # probabilities of every eval image and its out-of-fold ones of every training image
    teacher = {"eval_image_id": eval_ids, "oof_image_id": pooled["image_id"],
               **{f"eval_{k}": voted[k].astype(np.float32) for k in labels.TABLE_KEYS},
               **{f"oof_{k}": v.astype(np.float32) for k, v in combine(used, weights, e["combine"]).items()}}
    report = {"members": members, "weights": shown, "combine": e["combine"],
              "weights_mode": e["weights"], "use_tta": e["use_tta"], "tta": cfg["infer"]["tta"],
              "ensemble": scores, "decision": decision, "submission": str(out / "submission.csv"),
              "predicted_class_counts": np.bincount(submission["ans"], minlength=labels.NUM_CLASSES).tolist(),
              **provenance(cfg, cfg["train"]["seed"], fingerprint)}
    artifact = ensemble_artifact(cfg, fingerprint, eval_key)
    with artifact.lock():  # submission.csv, ensemble_probs.npz and ensemble.json from one run, never two
        artifact.invalidate()
        atomic_write_text(out / "submission.csv", submission.to_csv(index=False, lineterminator="\n"))
        atomic_save_npz(out / ENSEMBLE_PROBS, **teacher)
        report["probs"] = {"path": str(out / ENSEMBLE_PROBS), "digest": file_digest(out / ENSEMBLE_PROBS)}
        atomic_write_json(out / ENSEMBLE_REPORT, report)
        artifact.seal(ensemble_oof_f1=scores["oof"]["f1"])
    for b, m in members.items():
        weight = weight_text(m["weight"])
        what = "OOF F1" if "joint" in oof[backbones.index(b)] else f"OOF F1 (mean of its heads {', '.join(m['heads'])})"
        print(f"[ensemble] {b:<32} weight {weight}  {what} {m['oof']['f1']:.4f}  with TTA {m['oof_tta']['f1']:.4f}")
    if scores["nested_weights_f1"] is not None:
        print(f"[ensemble] backbone weights fitted on other folds, scored on each (honest): OOF F1 "
              f"{scores['nested_weights_f1']:.4f}")
    nested = "n/a" if decision["nested_f1"] is None else f"{decision['nested_f1']:.4f}"
    print(f"[ensemble] decision rule (ensemble.decision: {e['decision']}): argmax {decision['argmax_f1']:.4f}; per-class "
          f"offsets fitted on other folds {nested} (honest), on all folds {decision['fitted_on_all_f1']:.4f}")
    print(f"[ensemble] ensemble OOF F1 {scores['oof']['f1']:.4f}, with TTA {scores['oof_tta']['f1']:.4f}; "
          f"wrote {out / 'submission.csv'} ({len(submission)} rows)")
    return report


if __name__ == "__main__":
    stage_main(run, "ensemble")
