"""audit stage: rank the training labels most likely wrong from the pooled out-of-fold probabilities
(pipeline.evaluate.audit, cleanlab). Writes <output.dir>/audit/: report.md, suspects.csv, contact_sheet.png
(the top suspects' photos with the recorded and the predicted label) and suggested_fixes.csv in
label_fixes.csv's format for a person to review and append; no label is changed. On generated data it
prints precision and recall against the noise synth planted and label_fixes.csv does not list."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from pipeline import labels
from pipeline.artifacts import output_dir
from pipeline.data.crop import crop_rule
from pipeline.data.dataset import train_fingerprint
from pipeline.data.faces import contact_sheet
from pipeline.data.layout import load_train, read_label_fixes
from pipeline.evaluate.audit import COLUMNS, audit, planted_recall, suggested_fixes
from pipeline.evaluate.ensemble import combine
from pipeline.evaluate.tables import oof_table, probs_of
from pipeline.errors import ArtifactError
from pipeline.io import atomic_write_bytes, atomic_write_json, atomic_write_text, provenance
from pipeline.stages import stage_main

SHEET_PEOPLE = 10


def run(cfg: dict, force: bool = False) -> dict:
    table, info = load_train(cfg)
    table = table.merge(info["people"][["person_id", "id"]], on="person_id", how="left")
    fingerprint = train_fingerprint(cfg, table)
    members = []
    for backbone in cfg["model"]["backbones"]:
        pooled = oof_table(cfg, backbone, table, fingerprint)
        if not np.array_equal(pooled["image_id"], table["image_id"].to_numpy().astype(str)):  # both sorted by id
            raise ArtifactError(f"audit: backbone {backbone}'s out-of-fold table does not list the training images "
                                f"in order; re-run: ./run.sh oof -c CONFIG")
        members.append(probs_of(pooled))
    probs = combine(members, np.ones(len(members)), cfg["ensemble"]["combine"])
    suspects = audit(table, probs)
    folder = output_dir(cfg, "audit")
    fixes = suggested_fixes(suspects)
    atomic_write_text(folder / "suggested_fixes.csv", fixes.to_csv(index=False, lineterminator="\n"))
    atomic_write_text(folder / "suspects.csv", suspects[list(COLUMNS)].to_csv(index=False, lineterminator="\n"))
    scores = _planted(cfg, suspects)
    sheet = _sheet(cfg, table, suspects, probs)
    atomic_write_bytes(folder / "contact_sheet.png", cv2.imencode(".png", sheet[:, :, ::-1])[1].tobytes())
    report = {"suspects": int(len(suspects)), "by_field": suspects["field"].value_counts().to_dict(),
              "planted": scores, **provenance(cfg, cfg["train"]["seed"], fingerprint)}
    atomic_write_json(folder / "report.json", report)
    atomic_write_text(folder / "report.md", _markdown(suspects, scores))
    print(f"[audit] {len(suspects)} suspect labels ({', '.join(f'{k} {v}' for k, v in report['by_field'].items())}) "
          f"of {table['person_id'].nunique()} people; {folder / 'suggested_fixes.csv'} for review")
    for name, s in scores.items():
        print(f"[audit] against the unlisted planted noise, top {s['k']} ({name}): precision {s['precision']:.2f}, "
              f"recall {s['recall']:.2f} ({s['hits']} of {s['planted']})")
    return report


def _planted(cfg: dict, suspects) -> dict:
    """Precision and recall against synth's planted noise that label_fixes.csv does not list (the demo only)."""
    synth_file = Path(cfg["data"]["root"]) / "synth.json"
    if not synth_file.exists():
        return {}
    noise = json.loads(synth_file.read_text()).get("label_noise", [])
    listed = set()
    if cfg["data"]["label_fixes"] and Path(cfg["data"]["label_fixes"]).exists():
        fixes = read_label_fixes(cfg["data"]["label_fixes"])
        listed = set(zip(fixes["id"], fixes["field"]))
    unlisted = [n for n in noise if (n["id"], n["field"]) not in listed]
    if not unlisted:
        return {}
    return {"k = planted": planted_recall(suspects, unlisted, len(unlisted)),
            "k = all suspects": planted_recall(suspects, unlisted, len(suspects))}


def _sheet(cfg: dict, table, suspects, probs) -> np.ndarray:
    import pandas as pd

    predicted_mask = probs["mask"].argmax(1)
    captions = {f: f"{s} -> {labels.MASK_NAMES[m]}" for f, s, m in zip(table["file"], table["stem"], predicted_mask)}
    groups = []
    for row in suspects.head(SHEET_PEOPLE).itertuples(index=False):
        title = (f"{row.id} ({row.person_id}): {row.field} recorded {row.recorded}, looks {row.suggested} "
                 f"(p={row.confidence:.2f}, quality {row.quality:.3f})")
        groups.append((title, sorted(row.images)))
    empty = pd.DataFrame(columns=["file", "source", "chosen", "x0", "y0", "x1", "y1", "score"])
    return contact_sheet(groups or [("no suspects", [])], empty, crop_rule(cfg), cfg["data"]["max_image_pixels"],
                         captions)


def _markdown(suspects, scores: dict) -> str:
    lines = ["# Label audit", "", "From the pooled out-of-fold probabilities (every backbone, equal weights), by "
             "cleanlab's confident learning; gender and age per person (their 7 photos' mean), the mask per photo. "
             "Nothing is changed: review `suggested_fixes.csv` and append what is right to the label fixes file.", "",
             f"{len(suspects)} suspects.", ""]
    if scores:
        lines += ["| against the unlisted planted noise | k | hits | precision | recall |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {s['k']} | {s['hits']} | {s['precision']:.2f} | {s['recall']:.2f} |"
                  for name, s in scores.items()]
        lines.append("")
    lines += ["| id | person | field | recorded | looks | p | quality |", "|---|---|---|---|---|---:|---:|"]
    lines += [f"| {r.id} | {r.person_id} | {r.field} | {r.recorded} | {r.suggested} | {r.confidence:.2f} | "
              f"{r.quality:.3f} |" for r in suspects.head(30).itertuples(index=False)]
    lines += ["", "![the top suspects](contact_sheet.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    stage_main(run, "audit")
