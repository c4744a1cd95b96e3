"""folds stage: person-grouped, stratified folds (pipeline.data.folds), shared by every backbone and run."""
from __future__ import annotations

from pipeline.data.folds import folds_artifact, folds_csv, folds_path, read_folds, write_folds
from pipeline.data.layout import load_train
from pipeline.errors import StaleArtifactError
from pipeline.stages import stage_main


def run(cfg: dict, force: bool = False) -> dict:
    table, _ = load_train(cfg)
    artifact = folds_artifact(cfg, table)
    with artifact.lock():
        return _make(cfg, table, artifact, force)


def _make(cfg: dict, table, artifact, force: bool) -> dict:
    path = folds_path(cfg)
    status, message = artifact.state()
    if status == "fresh" and not force:
        print(f"[folds] {message}; reusing it")
        return {"path": str(path)}
    if status == "stale" and not force:
        read_folds(cfg)  # a file edited by hand: name its bad rows, if any, rather than only the file
        raise StaleArtifactError(message)  # shared by every run of this data: never overwritten silently
    if status == "missing" and path.exists() and not force:
        # no fingerprint: a run killed between the file and its stamp, or a file from elsewhere
        text = folds_csv(cfg, table)
        if path.read_bytes() != text.encode():
            raise StaleArtifactError(
                f"folds file {path} has no fingerprint ({artifact.stamp_path} not found) and is not the folds this "
                f"data gives with folds.k={cfg['folds']['k']} folds.seed={cfg['folds']['seed']}: it may have been "
                f"made for other data or by hand, and every run of this data shares it, so it was left as it is. "
                f"Restore its fingerprint to keep it, or replace it: ./run.sh folds -c CONFIG --force")
        write_folds(cfg, table, text)
        print(f"[folds] {path} had no fingerprint; it holds the folds of this data: fingerprint written")
        return {"path": str(path)}
    per_fold = write_folds(cfg, table)
    print(f"[folds] wrote {path}")
    for fold, counts in per_fold.items():
        print(f"  fold {fold}: {counts['people']} people")
    return {"path": str(path)}


if __name__ == "__main__":
    stage_main(run, "folds")
