"""export stage: the ensemble of a finished run (every fold of every backbone, the ensemble's fitted weights,
TTA, the crop rule, the face finder; gate.folds: only those folds) as a self-contained bundle folder, <output.dir>/bundle/, that
pipeline/gate/runtime.py loads with onnxruntime, numpy and OpenCV only (pipeline.gate.export)."""
from __future__ import annotations

from pipeline.data.dataset import eval_identity, train_fingerprint
from pipeline.data.images import cached_images
from pipeline.data.layout import load_eval, load_train
from pipeline.data.pixels import image_set
from pipeline.gate.export import export_bundle
from pipeline.stages import stage_main


def run(cfg: dict, force: bool = False):
    table, _ = load_train(cfg)
    eval_table, _ = load_eval(cfg)
    sample = cached_images(cfg, image_set(cfg, "eval", eval_table["file"]), desc="decode eval")[:64]
    return export_bundle(cfg, train_fingerprint(cfg, table), eval_identity(cfg, eval_table), sample, force=force)


if __name__ == "__main__":
    stage_main(run, "export")
