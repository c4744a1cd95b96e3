"""Predict with a bundle on whatever a gate sees: one photo, a folder or glob of photos, a video file, or a
camera (an OpenCV VideoCapture index or URL). One record per face (pipeline/gate/runtime.py), written
as predictions.csv and, for streams, as JSON lines while they run; --draw adds annotated copies."""
from __future__ import annotations

import csv
import glob
import io
import json
import time
from pathlib import Path

import cv2
import numpy as np

from pipeline.errors import DataError
from pipeline.gate.runtime import Gate, ImageError, decode

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".y4m", ".mjpeg")
COLOURS = {"ok": (40, 180, 40), "incorrect": (255, 170, 0), "no_mask": (220, 30, 30)}  # RGB: green, amber, red
COLUMNS = ("source", "face", "x0", "y0", "x1", "y1", "score", "class", "class_name", "probability", "mask",
           "mask_probability", "gender", "gender_probability", "age", "age_probability", "verdict")


def sources(text: str) -> tuple[str, list]:
    """('photos', [files]) for a photo, folder or glob; ('stream', [capture argument]) for a video or camera."""
    path = Path(text)
    if text.isdigit():
        return "stream", [int(text)]
    if "://" in text:
        return "stream", [text]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in PHOTO_EXTENSIONS and not p.name.startswith("."))
        if not files:
            raise DataError([f"{path}: no .jpg, .jpeg or .png photos in this folder"])
        return "photos", files
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text) if Path(p).suffix.lower() in PHOTO_EXTENSIONS)
        if not files:
            raise DataError([f"{text}: the pattern matches no .jpg, .jpeg or .png photos"])
        return "photos", files
    if not path.exists():
        raise DataError([f"{path}: no such file, folder or camera"])
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return "stream", [str(path)]
    if path.suffix.lower() in PHOTO_EXTENSIONS:
        return "photos", [path]
    raise DataError([f"{path}: not a photo ({'/'.join(PHOTO_EXTENSIONS)}) or a video ({'/'.join(VIDEO_EXTENSIONS)})"])


def annotate(image: np.ndarray, records: list[dict]) -> np.ndarray:
    """A copy of an RGB image with each face's box and its verdict in the verdict's colour."""
    out = image.copy()
    thick = max(2, round(max(image.shape[:2]) / 320))
    for r in records:
        x0, y0, x1, y1 = (int(round(v)) for v in r["box"])
        colour = COLOURS[r["verdict"]]
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, thick)
        label = f"{r['verdict'].upper().replace('_', ' ')} {r['heads']['mask']['probability']:.0%}"
        scale = max(0.5, (x1 - x0) / 220)
        (w, h), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        cv2.rectangle(out, (x0, max(y0 - h - 8, 0)), (x0 + w + 6, max(y0, h + 8)), colour, -1)
        cv2.putText(out, label, (x0 + 3, max(y0 - 5, h + 3)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick)
    return out


def _row(source: str, index: int, r: dict) -> dict:
    return {"source": source, "face": index, **dict(zip(("x0", "y0", "x1", "y1"), r["box"])),
            "score": "" if r["score"] is None else round(r["score"], 4), "class": r["class"],
            "class_name": r["class_name"], "probability": r["probability"],
            **{f"{h}": r["heads"][h]["class"] for h in ("mask", "gender", "age")},
            **{f"{h}_probability": r["heads"][h]["probability"] for h in ("mask", "gender", "age")},
            "verdict": r["verdict"]}


def predict_photos(gate: Gate, files: list[Path], faces: str, out: Path, draw: bool) -> list[dict]:
    from pipeline.io import atomic_write_bytes
    from tqdm import tqdm

    rows, problems = [], []
    for file in tqdm(files, desc="predict", unit="photo", leave=False):
        try:
            image = decode(Path(file).read_bytes(), gate.manifest["max_image_pixels"])
        except (ImageError, OSError) as error:
            problems.append(f"{file}: {error}")
            continue
        records = gate.predict(image, faces)
        rows.extend(_row(Path(file).name if len(files) > 1 else str(file), i, r) for i, r in enumerate(records))
        if draw:
            atomic_write_bytes(out / "annotated" / f"{Path(file).stem}.jpg",
                               cv2.imencode(".jpg", annotate(image, records)[:, :, ::-1])[1].tobytes())
    for line in problems:
        print(f"[predict] skipped {line}")
    return rows


def predict_stream(gate: Gate, source, faces: str, out: Path, draw: bool, rate: float, max_frames: int) -> list[dict]:
    """Frames sampled at `rate` per second of video time (a file) or of wall time (a camera), each frame's
    records appended to predictions.jsonl as they come."""
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise DataError([f"{source}: OpenCV cannot open this video or camera"])
    is_file = isinstance(source, str) and Path(source).exists()
    video_fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    step = max(int(round(video_fps / rate)), 1) if is_file else 1
    rows, frame_index, taken, last = [], -1, 0, 0.0
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "a") as lines:
        while max_frames <= 0 or taken < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            frame_index += 1
            if is_file and frame_index % step:
                continue
            if not is_file and time.monotonic() - last < 1 / rate:
                continue
            last = time.monotonic()
            image = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            records = gate.predict(image, faces)
            taken += 1
            lines.write(json.dumps({"frame": frame_index, "time_s": round(frame_index / video_fps, 3) if is_file
                                    else round(time.time(), 3), "faces": records}) + "\n")
            lines.flush()
            rows.extend(_row(f"frame {frame_index}", i, r) for i, r in enumerate(records))
            if draw:
                (out / "annotated").mkdir(exist_ok=True)
                cv2.imwrite(str(out / "annotated" / f"frame{frame_index:06d}.jpg"), annotate(image, records)[:, :, ::-1])
    capture.release()
    return rows


def write_table(rows: list[dict], path: Path) -> None:
    from pipeline.io import atomic_write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
