"""oof stage: pool every fold's validation probabilities into one out-of-fold table per backbone and report.

Writes <output.dir>/oof/: report.md, report.json, confusion and per-class PNGs, <backbone>.npz.
"""
from __future__ import annotations

from pipeline import labels
from pipeline.artifacts import output_dir, safe_name
from pipeline.data.dataset import train_fingerprint
from pipeline.data.layout import load_train
from pipeline.evaluate.report import backbone_report, markdown, plot_confusion, plot_per_class
from pipeline.evaluate.tables import oof_table
from pipeline.io import atomic_save_npz, atomic_write_json, atomic_write_text, provenance
from pipeline.stages import stage_main


def run(cfg: dict, force: bool = False) -> dict:
    table, _ = load_train(cfg)
    fingerprint = train_fingerprint(cfg, table)
    folder = output_dir(cfg, "oof")
    reports = {}
    for backbone in cfg["model"]["backbones"]:
        pooled = oof_table(cfg, backbone, table, fingerprint)
        atomic_save_npz(folder / f"{safe_name(backbone)}.npz", **pooled)
        reports[backbone] = backbone_report(pooled)
        if "probs_joint" in pooled:  # a per-task model has no 18-class prediction to confuse
            plot_confusion(pooled["label"], pooled["probs_joint"].argmax(1), f"{backbone}: OOF confusion",
                           folder / f"confusion_{safe_name(backbone)}.png")
    plot_per_class(reports, folder / "per_class_f1.png")
    atomic_write_json(folder / "report.json", {"backbones": reports,
                                               **provenance(cfg, cfg["train"]["seed"], fingerprint)})
    atomic_write_text(folder / "report.md", markdown(reports))
    for backbone, r in reports.items():
        heads = ", ".join(f"{h} {r[f'f1_{h}']:.3f}" for h in labels.HEADS if f"f1_{h}" in r)
        what = "pooled OOF macro F1" if "per_class_f1" in r else "mean of its heads' pooled OOF macro F1"
        print(f"[oof] {backbone}: {what} {r['f1']:.4f} ({heads}); folds {list(r['per_fold_f1'].values())}")
    print(f"[oof] report: {folder / 'report.md'}")
    return reports


if __name__ == "__main__":
    stage_main(run, "oof")
