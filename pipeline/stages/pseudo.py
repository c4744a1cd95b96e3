"""pseudo stage: pseudo-labels from this run's ensemble, for a second run to train on (pipeline.data.pseudo).

Reads <output.dir>/ensemble_probs.npz (checked against the digest ensemble.json recorded) and keeps, per eval
image and head, the ensemble's label where its probability reaches pseudo.thresholds. Writes
<output.dir>/pseudo/pseudo.csv and report.md. A second round trains with pseudo.labels naming that file and
another output.dir; its own pseudo stage writes there. A table made from another ensemble is never replaced
silently: that is refused unless --force.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import labels
from pipeline.artifacts import Artifact, file_digest, output_dir
from pipeline.data import layout
from pipeline.data.dataset import eval_identity, train_fingerprint
from pipeline.data.layout import load_eval, load_train, read_csv
from pipeline.data.pseudo import ENSEMBLE_PROBS, UNLABELLED, choose, teacher_tables
from pipeline.errors import ArtifactError, MissingArtifactError, StaleArtifactError
from pipeline.evaluate.tables import ENSEMBLE_REPORT, ensemble_artifact
from pipeline.io import atomic_write_text, write_provenance
from pipeline.stages import stage_main

PSEUDO_TABLE, REPORT = "pseudo.csv", "report.md"


def run(cfg: dict, force: bool = False) -> dict:
    probs_path, report_path = output_dir(cfg, ENSEMBLE_PROBS), output_dir(cfg, ENSEMBLE_REPORT)
    if not report_path.exists() or not probs_path.exists():
        raise MissingArtifactError(f"{probs_path} or {report_path} not found; run: ./run.sh ensemble -c CONFIG")
    recorded = json.loads(report_path.read_text()).get("probs", {}).get("digest")
    digest = file_digest(probs_path)
    if recorded != digest:
        raise StaleArtifactError(f"{probs_path} is not the one {report_path} recorded (digest {digest}, recorded "
                                 f"{recorded}); re-run: ./run.sh ensemble -c CONFIG")
    thresholds = dict(cfg["pseudo"]["thresholds"])
    artifact = Artifact(what="pseudo labels", folder=output_dir(cfg, "pseudo"),
                        identity={"ensemble_probs": digest, "thresholds": thresholds},
                        remedy="./run.sh pseudo -c CONFIG --force", outputs=(PSEUDO_TABLE, REPORT))
    table_path = artifact.path(PSEUDO_TABLE)
    if cfg["pseudo"]["labels"] and _same_file(cfg["pseudo"]["labels"], table_path):
        raise ArtifactError(f"pseudo.labels is {table_path}, the table this stage would write: this run trained "
                            f"on it. A second round is a new run: set output.dir to another folder")
    train_table, _ = load_train(cfg)
    info, _ = load_eval(cfg)
    # fitted on the current inference tables: after a retrain and a re-infer, the old ensemble is refused
    ensemble_artifact(cfg, train_fingerprint(cfg, train_table), eval_identity(cfg, info)).require()
    with artifact.lock():
        status, message = artifact.state()
        if status == "fresh" and not force:
            print(f"[pseudo] {message}; skipping (--force to redo)")
            return artifact.read_stamp()
        if status == "stale" and not force:
            raise StaleArtifactError(f"{message.split('; re-run')[0]}: a table a second run may have trained on "
                                     f"is never replaced silently; keep it and set output.dir to another folder for a "
                                     f"new round, or replace it: ./run.sh pseudo -c CONFIG --force")
        artifact.invalidate()
        info, _ = load_eval(cfg)
        table = teacher_tables(probs_path)["eval"]
        if not np.array_equal(table["image_id"].astype(str), info["ImageID"].to_numpy().astype(str)):
            raise StaleArtifactError(f"{probs_path} does not list eval/info.csv's ImageIDs in order; "
                                     f"re-run: ./run.sh ensemble -c CONFIG")
        chosen = choose(table, info["ImageID"], thresholds)
        counts = {h: int((chosen[h] != UNLABELLED).sum()) for h in labels.HEADS}
        counts["any"] = int((chosen[list(labels.HEADS)] != UNLABELLED).any(axis=1).sum())
        counts["all"] = int((chosen[list(labels.HEADS)] != UNLABELLED).all(axis=1).sum())
        accuracy = _accuracy(cfg, chosen)
        atomic_write_text(table_path, chosen.to_csv(index=False, lineterminator="\n"))
        atomic_write_text(artifact.path(REPORT), _report(cfg, len(chosen), counts, accuracy, thresholds))
        write_provenance(artifact.folder, cfg, cfg["train"]["seed"], {"ensemble_probs": digest})
        stamp = artifact.seal(images=len(chosen), labelled=counts, accuracy=accuracy)
    for head in labels.HEADS:
        shown = "" if accuracy is None else f", {accuracy[head]:.3f} of them right (held-out answers)"
        print(f"[pseudo] {head:<6} threshold {thresholds[head]:.2f}: {counts[head]} of {len(chosen)} eval images{shown}")
    print(f"[pseudo] {counts['any']} eval images carry at least one label, {counts['all']} all three; wrote {table_path}")
    print(f"[pseudo] next round: ./run.sh all -c CONFIG pseudo.labels={table_path} output.dir=<a new folder>")
    return stamp


def _same_file(configured: str, table_path) -> bool:
    return Path(configured).resolve() == Path(table_path).resolve()


def _accuracy(cfg: dict, chosen: pd.DataFrame) -> dict | None:
    """Per head, the share of the kept labels that the demo's held-out answers confirm (None on real data)."""
    path = layout.heldout_answers(cfg["data"]["root"])  # the demo's (synth): only the report's precision reads them
    if not path.exists():
        return None
    truth = read_csv(path, ("ImageID", "ans")).set_index("ImageID")["ans"].astype(int)
    mask, gender, age = labels.decompose(truth.reindex(chosen["ImageID"]).to_numpy())
    true = {"mask": mask, "gender": gender, "age": age}
    out = {}
    for head in labels.HEADS:
        kept = chosen[head].to_numpy() != UNLABELLED
        out[head] = float((chosen[head].to_numpy()[kept] == true[head][kept]).mean()) if kept.any() else float("nan")
    return out


def _report(cfg: dict, total: int, counts: dict, accuracy: dict | None, thresholds: dict) -> str:
    lines = [f"# Pseudo-labels: {cfg['name']}", "",
             f"From {output_dir(cfg, ENSEMBLE_PROBS)}: the ensemble's probabilities of {total} eval images.", "",
             "| head | threshold | labelled | share |" + (" right (held-out) |" if accuracy else ""),
             "|---|---|---|---|" + ("---|" if accuracy else "")]
    for head in labels.HEADS:
        right = f" {accuracy[head]:.3f} |" if accuracy else ""
        lines.append(f"| {head} | {thresholds[head]:.2f} | {counts[head]} | {counts[head] / max(total, 1):.3f} |{right}")
    lines += ["", f"{counts['any']} images carry at least one label (they join every fold's training set), "
                  f"{counts['all']} all three. A head at -1 adds no loss.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    stage_main(run, "pseudo")
