"""Predict with a bundle on whatever a gate sees: one photo, a folder or glob of photos, a video file, or a
camera (an OpenCV VideoCapture index or URL). One record per face (pipeline/gate/runtime.py), written
as predictions.csv and, for streams, as JSON lines while they run; --draw adds annotated copies.

Each run's outputs replace the last run's: they are written into a fresh folder beside them and moved into
place at the end (a stream's JSON lines grow in predictions.jsonl.partial while it runs), with predict.json,
the record of what made them. Only regular files are read, under the gate's size cap (a FIFO named .jpg would
block the read forever, a link to /dev/zero never end)."""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import shutil
import stat
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


def read_photo(file: Path, max_bytes: int) -> bytes:
    """A photo's bytes: a regular file (followed through links) of at most `max_bytes`; OSError naming why not."""
    info = os.stat(file)
    if not stat.S_ISREG(info.st_mode):
        raise OSError("not a regular file (a folder, FIFO or device), not a photo")
    if info.st_size > max_bytes:
        raise OSError(f"{info.st_size} bytes is over the size cap ({max_bytes} bytes, gate.max_upload_mb)")
    with open(file, "rb") as handle:
        return handle.read(max_bytes + 1)


def predict_photos(gate: Gate, files: list[Path], faces: str, out: Path, draw: bool, max_bytes: int,
                   problems: list[str]) -> list[dict]:
    """One row per face; each photo that could not be read or decoded is named in `problems`."""
    from pipeline.io import atomic_write_bytes
    from pipeline.progress import progress

    rows = []
    for file in progress(files, desc="predict", unit="photo", leave=False):
        try:
            image = decode(read_photo(Path(file), max_bytes), gate.manifest["max_image_pixels"])
        except (ImageError, OSError) as error:
            problems.append(f"{file}: {getattr(error, 'strerror', None) or error}")
            continue
        records = gate.predict(image, faces)
        rows.extend(_row(Path(file).name if len(files) > 1 else str(file), i, r) for i, r in enumerate(records))
        if draw:
            atomic_write_bytes(out / "annotated" / f"{Path(file).stem}.jpg",
                               cv2.imencode(".jpg", annotate(image, records)[:, :, ::-1])[1].tobytes())
    return rows


class Sampler:
    """Which frames to take for `rate` a second: the first frame at or after each tick k / rate of the clock
    (the video's time for a file, the wall clock for a camera). A 10 fps video at --fps 4 gives 4 a second,
    where rounding a frame step (10 / 4 = 2.5 -> every 2nd) gave 5."""

    def __init__(self, rate: float):
        self.period, self.next = 1.0 / rate, 0.0

    def take(self, t: float) -> bool:
        if t + 1e-9 < self.next:
            return False
        self.next += self.period * max(1, int((t - self.next) / self.period) + 1)  # skip ticks a slow frame missed
        return True


def predict_stream(gate: Gate, source, faces: str, out: Path, draw: bool, rate: float, max_frames: int,
                   record: dict) -> list[dict]:
    """Frames sampled at `rate` per second of video time (a file) or of wall time (a camera), each frame's
    records appended to predictions.jsonl.partial as they come. The capture is released on every path; Ctrl-C
    ends the run as the end of the stream would (record["interrupted"] says so)."""
    capture = cv2.VideoCapture(source)
    try:
        if not capture.isOpened():
            raise DataError([f"{source}: OpenCV cannot open this video or camera"])
        is_file = isinstance(source, str) and Path(source).exists()
        video_fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        sampler, started = Sampler(rate), time.monotonic()
        rows, frame_index, taken = [], -1, 0
        with open(out / "predictions.jsonl.partial", "w") as lines:
            try:
                while max_frames <= 0 or taken < max_frames:
                    if not capture.grab():  # the next frame, not decoded: a frame not taken costs no decoding,
                        break               # and a camera's buffer is drained while a slow frame was judged
                    frame_index += 1
                    if not sampler.take(frame_index / video_fps if is_file else time.monotonic() - started):
                        continue
                    ok, frame = capture.retrieve()
                    if not ok:
                        break
                    image = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                    records = gate.predict(image, faces)
                    taken += 1
                    lines.write(json.dumps({"frame": frame_index, "time_s": round(frame_index / video_fps, 3)
                                            if is_file else round(time.time(), 3), "faces": records}) + "\n")
                    lines.flush()
                    rows.extend(_row(f"frame {frame_index}", i, r) for i, r in enumerate(records))
                    if draw:
                        (out / "annotated").mkdir(exist_ok=True)
                        cv2.imwrite(str(out / "annotated" / f"frame{frame_index:06d}.jpg"),
                                    annotate(image, records)[:, :, ::-1])
            except KeyboardInterrupt:
                record["interrupted"] = True
        record.update(frames_read=frame_index + 1, frames_taken=taken,
                      video_fps=round(video_fps, 3) if is_file else None)
        os.replace(out / "predictions.jsonl.partial", out / "predictions.jsonl")
        return rows
    finally:
        capture.release()


def new_run_folder(out: Path) -> Path:
    """A fresh, empty folder beside `out` where a run writes; `finish_run` moves its files into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for left in out.glob(".run-*"):  # a killed run's folder (its process gone): never moved into place, removed
        if not _alive(left.name.removeprefix(".run-")):
            shutil.rmtree(left, ignore_errors=True)
    work = out / f".run-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    return work


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def finish_run(work: Path, out: Path) -> None:
    """Replace the last run's outputs in `out` by this run's: each file by an atomic rename; the last run's
    files that this run did not make (its annotated copies, a stream's JSON lines) are removed."""
    for name in ("annotated", "predictions.jsonl", "predictions.jsonl.partial"):
        old = out / name
        if not (work / name).exists() and old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    for item in sorted(work.iterdir(), key=lambda p: p.name == "predict.json"):  # the record last
        target = out / item.name
        if item.is_dir() and target.exists():
            trash = out / f".old-{item.name}-{os.getpid()}"
            os.replace(target, trash)
            os.replace(item, target)
            shutil.rmtree(trash)
        else:
            os.replace(item, target)
    work.rmdir()


def write_table(rows: list[dict], path: Path) -> None:
    from pipeline.io import atomic_write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
