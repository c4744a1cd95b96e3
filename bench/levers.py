"""What each data-centric lever does on the demo, every number from one commit and the same seeds.

    python bench/levers.py [--out runs/levers] [--json FILE]

Runs the demo (configs/demo.yaml: generated data, 2 backbones x 5 folds, CPU) as separate runs under --out:
  plain     the demo as ./run.sh runs it
  fixes     + the audit's suggestions that a reviewer confirms, appended to the label fixes (the review is
            simulated with synth.json, which knows the planted noise: only true suspects are fixed, as a
            person looking at the contact sheet would; no suspect the audit did not rank is added)
  pseudo    + pseudo-labels from plain's ensemble (the pseudo stage at pseudo.thresholds)
  decision  plain's probabilities with ensemble.decision: offsets (no retraining)
  student   one regnetx_002 trained on plain's ensemble probabilities (distill.teacher), 5 folds; its fold-0
            model alone is what the gate would run (gate.folds: [0])
and prints one table: OOF macro F1 (selected on the same folds: optimistic), the nested estimate where one
exists, the held-out eval macro F1 (the demo's answers), and, for plain's ten-model bundle and the student's
one-model bundle, crops per second through onnxruntime (2 threads). Every stage skips work already done, so a
second call only prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipeline.config import load_config  # noqa: E402
from pipeline.stages import chain  # noqa: E402

STUDENT = "regnetx_002"


def stage(name: str, overrides: list[str]) -> None:
    started = time.time()
    subprocess.run([sys.executable, "-m", f"pipeline.stages.{name}", "-c", "configs/demo.yaml", *overrides],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    print(f"  {name} {time.time() - started:.0f}s", flush=True)


def run_all(overrides: list[str], stages=None) -> None:
    for name in stages or chain(demo=True):
        stage(name, overrides)


def confirmed_fixes(plain: Path, demo_fixes: Path, data: Path, out: Path) -> int:
    """The demo's label fixes plus the audit's suggestions that are planted noise (a reviewer's yes), with the
    true value synth.json knows (an age fix names a band; the reviewer writes the age). Returns how many."""
    noise = {(n["path"], n["field"]): n for n in json.loads((data / "synth.json").read_text())["label_noise"]}
    suspects = pd.read_csv(plain / "audit" / "suspects.csv", dtype=str)
    rows = []
    for s in suspects.itertuples(index=False):
        planted = noise.get((s.person_id, s.field))
        if planted is not None:  # the folder names the person (an id may be shared)
            rows.append(f"{s.person_id},{s.field},{planted['true']},audit suspect confirmed in review\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(demo_fixes.read_text().rstrip("\n") + "\n" + "".join(rows))
    return len(rows)


def heldout(cfg_overrides: list[str], submission: Path) -> float:
    from pipeline.stages.summary import heldout_f1

    return heldout_f1(load_config("configs/demo.yaml", cfg_overrides), submission)


def single_model_heldout(run: Path, data: Path) -> float:
    """Macro F1 on the held-out answers of the student's fold-0 model alone (its eval table's argmax)."""
    from pipeline.evaluate.metrics import macro_f1
    from pipeline.io import load_npz

    table = load_npz(run / "infer" / STUDENT / "fold0" / "eval_probs.npz")
    truth = pd.read_csv(data / "eval_answers.csv", dtype={"ImageID": str}).set_index("ImageID")["ans"]
    return macro_f1(truth.reindex(table["image_id"].astype(str)).to_numpy(), table["probs_joint"].argmax(1))


def crops_per_second(bundle: Path, crops: np.ndarray, repeats: int = 5) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(bundle / "ensemble.onnx"), options, providers=["CPUExecutionProvider"])
    session.run(None, {"crops": crops[:8]})  # warm up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for start in range(0, len(crops), 64):
            session.run(None, {"crops": crops[start:start + 64]})
        best = min(best, time.perf_counter() - started)
    return len(crops) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/levers")
    parser.add_argument("--json")
    args = parser.parse_args()
    out = ROOT / args.out
    cfg = load_config("configs/demo.yaml", [])
    data = ROOT / cfg["data"]["root"]
    runs = {name: out / name for name in ("plain", "fixes", "pseudo", "student")}
    base = {name: [f"output.dir={path}", f"folds.dir={path}/folds"] for name, path in runs.items()}

    print("plain: the demo", flush=True)
    run_all(base["plain"])
    stage("export", base["plain"])
    print("fixes: the confirmed audit suggestions appended to the label fixes", flush=True)
    fixes_file = out / "fixes" / "label_fixes.csv"
    confirmed = confirmed_fixes(runs["plain"], data / "label_fixes.csv", data, fixes_file)
    run_all(base["fixes"] + [f"data.label_fixes={fixes_file}"], [s for s in chain(demo=True) if s != "synth"])
    print("pseudo: pseudo-labels from plain's ensemble", flush=True)
    stage("pseudo", base["plain"])
    pseudo_table = runs["plain"] / "pseudo" / "pseudo.csv"
    run_all(base["pseudo"] + [f"pseudo.labels={pseudo_table}"], [s for s in chain(demo=True) if s != "synth"])
    print("student: one backbone on plain's ensemble probabilities", flush=True)
    student = base["student"] + [f"distill.teacher={runs['plain'] / 'ensemble_probs.npz'}",
                                 f"model.backbones=[{STUDENT}]", "gate.folds=[0]"]
    run_all(student, [s for s in chain(demo=True) if s not in ("synth", "audit")])
    stage("export", student)

    print("decision: ensemble.decision=offsets on plain's tables", flush=True)
    import shutil  # the decision rule: plain's tables, its own ensemble report in another folder (nothing retrained)

    for sub in ("train", "infer"):
        target = out / "decision" / sub
        if not target.exists():
            shutil.copytree(runs["plain"] / sub, target)
    decision = [f"output.dir={out}/decision", f"folds.dir={runs['plain']}/folds", "ensemble.decision=offsets"]
    stage("ensemble", decision)

    reports = {name: json.loads((path / "ensemble.json").read_text()) for name, path in
               {**runs, "decision": out / "decision"}.items()}
    pseudo_stamp = json.loads((runs["plain"] / "pseudo" / "done.json").read_text())
    from pipeline.data.images import cached_images
    from pipeline.data.layout import load_eval
    from pipeline.data.pixels import image_set

    info, _ = load_eval(cfg)
    crops = np.ascontiguousarray(cached_images(cfg, image_set(cfg, "eval", info["file"]), desc="decode eval")[:256])
    speed = {"plain": crops_per_second(runs["plain"] / "bundle", crops),
             "student": crops_per_second(runs["student"] / "bundle", crops)}
    rows = []
    for name, label in (("plain", "plain ensemble (2 backbones x 5 folds)"),
                        ("fixes", f"+ audit fixes ({confirmed} confirmed suggestions)"),
                        ("pseudo", f"+ pseudo-labels ({pseudo_stamp['labelled']['any']} eval images)"),
                        ("decision", "+ decision rule (per-class offsets)"),
                        ("student", f"student: one {STUDENT} (fold 0 alone)")):
        e = reports[name]["ensemble"]
        run_overrides = decision if name == "decision" else base[name]
        if name == "student":
            held = single_model_heldout(runs["student"], data)
        else:
            held = heldout(run_overrides, Path(reports[name]["submission"]))
        nested = (reports[name]["decision"]["nested_f1"] if name == "decision" else e.get("nested_weights_f1"))
        rows.append({"run": name, "what": label, "oof_f1": e["oof"]["f1"], "oof_f1_tta": e["oof_tta"]["f1"],
                     "nested": nested, "heldout_f1": held, "crops_per_s": speed.get(name)})
    rows[-1]["student_5fold_heldout_f1"] = heldout(base["student"], Path(reports["student"]["submission"]))
    print("\n| run | OOF F1 | OOF F1 +TTA | nested (honest) | held-out eval F1 | crops/s (bundle) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        nested = "" if r["nested"] is None else f"{r['nested']:.4f}"
        speed_text = "" if r["crops_per_s"] is None else f"{r['crops_per_s']:.0f}"
        print(f"| {r['what']} | {r['oof_f1']:.4f} | {r['oof_f1_tta']:.4f} | {nested} | {r['heldout_f1']:.4f} | "
              f"{speed_text} |")
    print(f"\nstudent, all 5 folds soft-voted: held-out eval F1 {rows[-1]['student_5fold_heldout_f1']:.4f}")
    print(f"pseudo-labels per head: {pseudo_stamp['labelled']}; right (held-out): {pseudo_stamp['accuracy']}")
    print(f"audit, against the unlisted planted noise: "
          f"{json.loads((runs['plain'] / 'audit' / 'report.json').read_text())['planted']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "pseudo": pseudo_stamp["labelled"]}, indent=1))


if __name__ == "__main__":
    main()
