"""synth stage: the demo dataset in the competition layout (pipeline.data.synth); skipped when up to date."""
from __future__ import annotations

from pipeline.data import synth
from pipeline.stages import stage_main


def run(cfg: dict, force: bool = False) -> dict:
    artifact = synth.synth_artifact(cfg)
    with artifact.lock():
        return _make(cfg, artifact, force)


def _make(cfg: dict, artifact, force: bool) -> dict:
    status, message = artifact.state()
    if status == "fresh" and not force:
        print(f"[synth] {message}; skipped (--force to redo)")
        return synth.result(artifact, artifact.read_stamp(), skipped=True)
    if status == "stale":
        print(f"[synth] {message.split(';')[0]}: replacing it")
    synth.prepare_folder(artifact)
    stamp = synth.finish(artifact, synth.generate(cfg))
    return synth.result(artifact, stamp, skipped=False)


if __name__ == "__main__":
    stage_main(run, "synth")
