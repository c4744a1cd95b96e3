"""infer stage: every (backbone, fold) best checkpoint predicts the eval images, and its own validation
images, with the configured TTA. Writes <output.dir>/infer/<backbone>/fold<k>/eval_probs.npz and
val_probs_tta.npz; a folder made from the current checkpoint, TTA and eval images is skipped."""
from __future__ import annotations

from pipeline.artifacts import infer_artifact, job_list, require_all, train_artifact
from pipeline.data.dataset import load_train_data, resident
from pipeline.data.images import cached_images, files_key
from pipeline.data.layout import load_eval
from pipeline.io import write_provenance
from pipeline.stages import stage_main
from pipeline.train.model import resolve_device
from pipeline.train.predict import load_best_model, predict_fold


def run(cfg: dict, force: bool = False) -> list:
    data = load_train_data(cfg)
    eval_table, _ = load_eval(cfg)
    eval_key = files_key(eval_table["file"])
    jobs = {(b, f): train_artifact(cfg, b, f, data.fingerprint) for b, f in job_list(cfg)}
    # every checkpoint must be there before any work starts: name each one that is not
    require_all(list(jobs.values()), "fold checkpoints not usable, run the train stage first")
    eval_images = cached_images(cfg, eval_table["file"], desc="decode eval")
    device = resolve_device(cfg["train"]["device"])
    stores = {"train": data.store(device), "eval": resident(eval_images, device)}  # on the GPU once, for every fold
    outputs = []
    for (backbone, fold), job in jobs.items():
        out = infer_artifact(cfg, backbone, fold, job.read_stamp()["token"], eval_key)
        outputs.append(out.folder)
        with out.lock():
            if out.is_fresh() and not force:
                print(f"[infer] {out.state()[1]}; skipping (--force to redo)")
                continue
            out.invalidate()
            model = load_best_model(cfg, job, backbone, device)
            predict_fold(cfg, model, data, fold, eval_table, stores, device, out)
            write_provenance(out.folder, cfg, cfg["train"]["seed"], {"train_job": job.key, "data_fingerprint":
                                                                     data.fingerprint, "tta": cfg["infer"]["tta"]})
            out.seal(backbone=backbone, fold=fold)
        print(f"[infer] {backbone} fold {fold}: {len(eval_table)} eval images and its validation images, "
              f"TTA {cfg['infer']['tta']}")
    return outputs


if __name__ == "__main__":
    stage_main(run, "infer")
