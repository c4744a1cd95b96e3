"""faces stage: find every face in every training and eval photo once (pipeline.data.faces), for
`data.crop.mode: detect`.

Writes one folder per image set under `faces.dir` (default beside the decoded-image cache, so every run
on the same data shares it; the folder is named by the images' bytes and the face finder's settings):
boxes.csv (one row per face: file relative to data.root, box and landmarks in source pixels, score,
source detector | normal | fallback, chosen: the row the models' crop is made from), report.md and
contact_sheet.png. With `data.crop.mode: box` there is nothing to find and the stage says so.
"""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from pipeline import labels
from pipeline.artifacts import BOXES, CONTACT_SHEET, FACES_REPORT, faces_artifact
from pipeline.data.crop import crop_rule
from pipeline.data.faces import choose_faces, contact_sheet, detect_files, write_boxes
from pipeline.data.layout import load_eval, load_train
from pipeline.data.pixels import pixel_key
from pipeline.io import atomic_write_bytes, atomic_write_text
from pipeline.stages import stage_main


def run(cfg: dict, force: bool = False) -> dict:
    if cfg["data"]["crop"]["mode"] != "detect":
        print("[faces] data.crop.mode is box: every photo is cropped by data.crop.box, no faces to find "
              "(data.crop.mode=detect crops around the face)")
        return {}
    table, _ = load_train(cfg)
    eval_table, _ = load_eval(cfg)
    people = table[["file", "person_id", "stem", "mask"]]
    reports = {"train": _image_set(cfg, "train", list(table["file"]), people, force),
               "eval": _image_set(cfg, "eval", list(eval_table["file"]), None, force)}
    _print_summary(reports)
    return reports


def _image_set(cfg: dict, name: str, files: list[str], people: pd.DataFrame | None, force: bool) -> dict:
    artifact = faces_artifact(cfg, name, pixel_key(cfg, files))
    with artifact.lock():
        if artifact.is_fresh() and not force:
            print(f"[faces] {artifact.state()[1]}; skipping (--force to detect again)")
            return artifact.read_stamp()["report"]
        artifact.invalidate()
        found, rate = detect_files(files, cfg, desc=f"faces {name}")
        boxes = choose_faces(found, cfg["data"]["crop"]["box"], cfg["faces"]["person_box"], people)
        report = _report(name, boxes, people, rate, cfg)
        write_boxes(boxes, artifact.path(BOXES), cfg["data"]["root"])
        atomic_write_text(artifact.path(FACES_REPORT), _markdown(name, report, cfg))
        sheet = _sheet(cfg, name, boxes, people)
        atomic_write_bytes(artifact.path(CONTACT_SHEET), cv2.imencode(".png", sheet[:, :, ::-1])[1].tobytes())
        artifact.seal(report=report)
    print(f"[faces] {name}: {artifact.folder}")
    return report


def _report(name: str, boxes: pd.DataFrame, people: pd.DataFrame | None, rate: float, cfg: dict) -> dict:
    chosen = boxes[boxes["chosen"]]
    faces_per_image = boxes[boxes["source"] == "detector"].groupby("file").size()
    fallbacks = chosen[chosen["source"] == "fallback"]["file"]
    report = {"images": int(len(chosen)), "with_a_face": int(len(faces_per_image)),
              "several_faces": int((faces_per_image > 1).sum()),
              "chosen_by_source": {s: int((chosen["source"] == s).sum()) for s in ("detector", "normal", "fallback")},
              "images_per_second": round(rate, 1), "workers": cfg["data"]["num_workers"]}
    if people is not None:
        mask_of = dict(zip(people["file"], people["mask"]))
        report["fallbacks_by_mask"] = {labels.MASK_NAMES[m]: int(sum(mask_of[f] == m for f in fallbacks))
                                       for m in range(labels.NUM_MASK)}
        found = boxes[boxes["source"] == "detector"]["file"].unique()
        report["found_by_mask"] = {labels.MASK_NAMES[m]: [int(sum(mask_of[f] == m for f in found)),
                                                          int(sum(v == m for v in mask_of.values()))]
                                   for m in range(labels.NUM_MASK)}
    return report


def _finder_text(faces: dict) -> str:
    if faces["finder"] == "blazeface":
        return f"BlazeFace (MediaPipe's back model, onnxruntime), min score {faces['blazeface_min_score']}"
    return f"MTCNN (facenet-pytorch), min score {faces['min_score']}, detect scale {faces['detect_scale']}"


def _markdown(name: str, report: dict, cfg: dict) -> str:
    lines = [f"# Faces: {name} images", "",
             f"Detector: {_finder_text(cfg['faces'])}, smallest face {cfg['faces']['min_face']} px, person box "
             f"{cfg['faces']['person_box']}; {report['images_per_second']} images/s on {report['workers']} workers.", "",
             "| images | with a face | several faces | cropped by own face | by the unmasked photo's | fallback box |",
             "|---:|---:|---:|---:|---:|---:|",
             f"| {report['images']} | {report['with_a_face']} | {report['several_faces']} | "
             f"{report['chosen_by_source']['detector']} | {report['chosen_by_source']['normal']} | "
             f"{report['chosen_by_source']['fallback']} |", ""]
    if "fallbacks_by_mask" in report:
        lines += ["| mask | photos | face found | fallback box |", "|---|---:|---:|---:|"]
        for mask, (found, total) in report["found_by_mask"].items():
            lines.append(f"| {mask} | {total} | {found} | {report['fallbacks_by_mask'][mask]} |")
        lines.append("")
    lines += [f"![contact sheet]({CONTACT_SHEET})", "",
              "Green: every face found, with its score. Yellow: the crop the models see. Red: the fixed box "
              "(no face passed the score).", ""]
    return "\n".join(lines)


def _sheet(cfg: dict, name: str, boxes: pd.DataFrame, people: pd.DataFrame | None) -> np.ndarray:
    """A sample of people with their 7 photos (train; for eval a sample of photos), then every fallback image."""
    rng = np.random.default_rng(0)
    chosen = boxes[boxes["chosen"]].set_index("file")["source"]
    groups = []
    if people is not None:
        persons = people["person_id"].unique()
        sample = rng.choice(persons, size=min(cfg["faces"]["sheet_people"], len(persons)), replace=False)
        for person in sorted(sample):
            files = people[people["person_id"] == person].sort_values("stem")["file"].tolist()
            groups.append((f"person {person}", files))
        captions = {f: f"{s} ({chosen[f]})" for f, s in zip(people["file"], people["stem"])}
    else:
        files = list(chosen.index)
        sample = sorted(rng.choice(len(files), size=min(cfg["faces"]["sheet_people"] * 7, len(files)), replace=False))
        groups.append(("a sample of eval photos", [files[i] for i in sample]))
        captions = {f: f"{f.rsplit('/', 1)[-1][:16]} ({s})" for f, s in chosen.items()}
    fallbacks = list(chosen[chosen == "fallback"].index)
    shown = fallbacks[:70]
    if fallbacks:
        groups.append((f"every fallback image: {len(fallbacks)}" + (f" (first {len(shown)} shown; all are in {BOXES})"
                                                                   if len(shown) < len(fallbacks) else ""), shown))
    return contact_sheet(groups, boxes, crop_rule(cfg), cfg["data"]["max_image_pixels"], captions)


def _print_summary(reports: dict) -> None:
    print(f"{'set':<6} {'images':>7} {'face':>7} {'several':>8} {'normal':>7} {'fallback':>9} {'img/s':>7}")
    for name, r in reports.items():
        print(f"{name:<6} {r['images']:>7} {r['with_a_face']:>7} {r['several_faces']:>8} "
              f"{r['chosen_by_source']['normal']:>7} {r['chosen_by_source']['fallback']:>9} {r['images_per_second']:>7}")
    if "fallbacks_by_mask" in reports.get("train", {}):
        print("train fallbacks by mask:", ", ".join(f"{k} {v}" for k, v in reports["train"]["fallbacks_by_mask"].items()))


if __name__ == "__main__":
    stage_main(run, "faces")
