"""The table ./run.sh prints at the end: OOF F1 per backbone, ensemble, TTA gain, held-out demo score, timings."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline import labels
from pipeline.artifacts import output_dir
from pipeline.data import layout
from pipeline.data.layout import read_csv
from pipeline.errors import ArtifactError, MaskfoldError, MissingArtifactError
from pipeline.evaluate.ensemble import weight_text
from pipeline.evaluate.metrics import macro_f1
from pipeline.io import atomic_write_text
from pipeline.stages import stage_main


def heldout_f1(cfg: dict, submission: Path) -> float | None:
    answers = layout.heldout_answers(cfg["data"]["root"])
    if not answers.exists():
        return None
    truth, predicted = read_csv(answers, ("ImageID", "ans")), read_csv(submission, ("ImageID", "ans"))
    for path, frame in ((answers, truth), (submission, predicted)):
        if frame["ImageID"].duplicated().any() or not frame["ans"].str.fullmatch(r"\d+").all():
            raise MaskfoldError(f"{path}: every ImageID once with an integer ans, expected")
    merged = predicted.merge(truth[["ImageID", "ans"]], on="ImageID", suffixes=("_pred", "_true"))
    if len(merged) != len(truth):
        raise MaskfoldError(f"{submission} covers {len(merged)} of {len(truth)} held-out images")
    return macro_f1(merged["ans_true"].astype(int), merged["ans_pred"].astype(int))


def honest_lines(ensemble: dict) -> list[str]:
    """What the OOF figures above are (selection-biased) and the honest estimates beside them (nested over folds:
    fitted on all folds but one, scored on that one)."""
    e, decision = ensemble["ensemble"], ensemble.get("decision") or {}
    lines = ["OOF F1 above is optimistic: each fold's best epoch was chosen on that fold, and the ensemble's "
             "weights were fitted on the same OOF"]
    honest = []
    if ensemble.get("weights_mode") == "fit" and e.get("nested_weights_f1") is not None:
        honest.append(f"weights fitted on other folds {e['nested_weights_f1']:.4f}")
    if decision.get("nested_f1") is not None:
        honest.append(f"decision offsets fitted on other folds {decision['nested_f1']:.4f} "
                      f"(argmax {decision['argmax_f1']:.4f}; rule in use: {decision.get('rule', 'argmax')})")
    if honest:
        lines.append("honest (nested over folds): " + "; ".join(honest))
    return lines


def _read_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
        if not isinstance(report, dict) or not {"members", "ensemble", "tta", "submission"} <= set(report):
            raise ValueError("not an ensemble report")
        return report
    except (OSError, ValueError) as error:  # a damaged file: JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ArtifactError(f"{path} is unreadable ({str(error)[:200]}); re-run: ./run.sh ensemble -c CONFIG") from error


def run(cfg: dict, force: bool = False, timings: str | None = None, score_heldout: bool = False) -> str:
    path = output_dir(cfg, "ensemble.json")
    if not path.exists():
        raise MissingArtifactError(f"{path} not found; run: ./run.sh ensemble -c CONFIG")
    ensemble = _read_report(path)
    rows = [("backbone", "weight", "OOF F1", "OOF F1 +TTA", "mask", "gender", "age")]
    for backbone, member in ensemble["members"].items():
        o, t, w = member["oof"], member["oof_tta"], member["weight"]
        # a per-task member: its weight per head it predicts, its F1 the mean of those heads' (marked *)
        weight = weight_text(w)
        partial = "" if all(f"f1_{h}" in o for h in labels.HEADS) else "*"
        rows.append((backbone, weight, f"{o['f1']:.4f}{partial}", f"{t['f1']:.4f}{partial}",
                     *(f"{o[f'f1_{h}']:.3f}" if f"f1_{h}" in o else "-" for h in labels.HEADS)))
    e = ensemble["ensemble"]
    rows.append(("ENSEMBLE", "", f"{e['oof']['f1']:.4f}", f"{e['oof_tta']['f1']:.4f}", f"{e['oof']['f1_mask']:.3f}",
                 f"{e['oof']['f1_gender']:.3f}", f"{e['oof']['f1_age']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["", "=" * 72, f"maskfold summary: {cfg['name']}  (output: {cfg['output']['dir']})", "-" * 72]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.append("-" * 72)
    if any("*" in row[2] for row in rows):
        lines.append("* a per-task member (model.tasks): the mean macro F1 of its heads; its weight per head")
    lines.append(f"TTA gain on ensemble OOF F1 ({', '.join(ensemble['tta'])}): "
                 f"{e['oof_tta']['f1'] - e['oof']['f1']:+.4f}")
    lines += honest_lines(ensemble)
    if score_heldout:
        score = heldout_f1(cfg, Path(ensemble["submission"]))
        lines.append(f"demo eval macro F1 (held-out answers): {score:.4f}" if score is not None
                     else "demo eval macro F1: no held-out answers found")
    if timings and Path(timings).exists():
        parts = [line.split() for line in Path(timings).read_text().splitlines() if line.strip()]
        total = sum(float(seconds) for _, seconds in parts)
        lines.append("wall time: " + ", ".join(f"{stage} {float(s):.0f}s" for stage, s in parts)
                     + f"; total {total:.0f}s")
    lines.append(f"submission: {ensemble['submission']}")
    lines.append("=" * 72)
    text = "\n".join(lines)
    print(text)
    atomic_write_text(output_dir(cfg, "summary.txt"), text + "\n")
    return text


def _args(parser) -> None:
    parser.add_argument("--timings", help="file of 'stage seconds' lines written by run.sh")
    parser.add_argument("--score-heldout", action="store_true", help="score submission.csv with the demo's answers")


if __name__ == "__main__":
    stage_main(run, "summary", extra_args=_args)
