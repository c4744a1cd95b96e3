"""The face finder's numbers: speed, the cost of detecting at reduced resolution, the cost of keying pixels by
their bytes, and how often MTCNN finds a masked face.

    python bench/faces.py [--images N] [--digest-files N] [--out FILE]

On the one real photograph at hand (Grace Hopper's portrait, shipped by matplotlib), resized to the
competition's 384x512:
  speed        images per second of one process (torch at 1 thread) per detect_scale, and of the
               faces stage's own parallel path (pipeline.data.faces.detect_files) on the configured workers;
               the faces stage's time on the full data (31,500 images) on 2 and 16 cores, from the per-process rate
  box shift    how far (pixels, source image) the box found at each scale lies from the full-resolution box
  digests      pipeline.data.pixels.pixel_key on N JPEG files of the real size (SHA-256 of every byte)
               against a stat-only key (path, size, mtime), warm page cache
  hard faces   the portrait with a painted mask (worn: nose to chin; incorrect: below the nose; none),
               at several sizes, positions and tilts in a 1280x720 frame: the share found per mask class
Prints tables; --out writes them as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipeline.config import load_config  # noqa: E402
from pipeline.data.faces import detect_faces, detect_files  # noqa: E402
from pipeline.data.pixels import pixel_key  # noqa: E402

FULL_DATA = 31_500  # 18,900 training + 12,600 eval photos


def portrait() -> np.ndarray:
    from matplotlib import cbook

    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def competition_sized(image: np.ndarray) -> np.ndarray:
    """384x512 (w x h) like the competition's photos: pad the 512x600 portrait to 3:4, then resize."""
    height, width = image.shape[:2]
    target_w = round(height * 0.75)
    pad = max(target_w - width, 0)
    canvas = cv2.copyMakeBorder(image, 0, 0, pad // 2, pad - pad // 2, cv2.BORDER_REPLICATE) if pad else image
    return cv2.resize(canvas, (384, 512), interpolation=cv2.INTER_AREA)


def painted_mask(image: np.ndarray, face, kind: str) -> np.ndarray:
    """A surgical-mask-like patch from the face's landmarks: `worn` over nose and mouth to the chin,
    `incorrect` below the nose (mouth and chin covered), `none` the photo as it is."""
    if kind == "none":
        return image.copy()
    out = image.copy()
    (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = face.landmarks
    x0, _, x1, y1 = face.box
    eyes_y = (ly + ry) / 2
    top = eyes_y + 0.45 * (ny - eyes_y) if kind == "worn" else ny + 0.35 * ((mly + mry) / 2 - ny)
    bottom = y1 + 0.06 * (y1 - face.box[1])
    width = x1 - x0
    polygon = np.array([[x0 + 0.02 * width, top], [x1 - 0.02 * width, top], [x1 - 0.06 * width, bottom - 0.25 * (bottom - top)],
                        [(x0 + x1) / 2, bottom], [x0 + 0.06 * width, bottom - 0.25 * (bottom - top)]], np.int32)
    cv2.fillPoly(out, [polygon], (168, 200, 225))
    for step in (0.3, 0.55, 0.8):  # pleats
        y = int(top + step * (bottom - top) * 0.8)
        cv2.line(out, (int(x0 + 0.08 * width), y), (int(x1 - 0.08 * width), y), (140, 170, 200), 2)
    cv2.line(out, (int(x0 + 0.02 * width), int(top)), (int(x0 - 0.05 * width), int(eyes_y)), (230, 230, 230), 2)
    cv2.line(out, (int(x1 - 0.02 * width), int(top)), (int(x1 + 0.05 * width), int(eyes_y)), (230, 230, 230), 2)
    return out


def per_process_rate(images: list[np.ndarray], faces_cfg: dict, scale: float, repeats: int = 2) -> float:
    import torch

    torch.set_num_threads(1)
    cfg = {**faces_cfg, "detect_scale": scale}
    detect_faces(images[:2], cfg)  # build the detector
    started = time.perf_counter()
    for _ in range(repeats):
        for start in range(0, len(images), 32):
            detect_faces(images[start:start + 32], cfg)
    return repeats * len(images) / (time.perf_counter() - started)


def speed(cfg: dict, base: np.ndarray, count: int, work: Path) -> dict:
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):  # small shifts and brightness changes, so no two inputs are the same
        shifted = np.roll(base, int(rng.integers(-12, 12)), axis=1)
        images.append(np.clip(shifted.astype(np.int16) + int(rng.integers(-20, 20)), 0, 255).astype(np.uint8))
    reference = detect_faces([base], {**cfg["faces"], "detect_scale": 1.0})[0][0].box
    rows = {}
    for scale in (1.0, 0.75, 0.5, 0.4):
        found = detect_faces([base], {**cfg["faces"], "detect_scale": scale})[0]
        shift = float(np.abs(np.array(found[0].box) - np.array(reference)).max()) if found else float("nan")
        rate = per_process_rate(images, cfg["faces"], scale)
        rows[scale] = {"images_per_s_one_process": round(rate, 1), "box_shift_px": round(shift, 1),
                       "full_data_min_2_cores": round(FULL_DATA / (2 * rate) / 60, 1),
                       "full_data_min_16_cores": round(FULL_DATA / (16 * rate) / 60, 1)}
    files = []
    for i, image in enumerate(images):
        files.append(str(work / f"speed{i}.jpg"))
        cv2.imwrite(files[-1], cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    _, stage_rate = detect_files(files, cfg)
    return {"by_scale": rows, "detect_files_images_per_s": round(stage_rate, 1),
            "workers": cfg["data"]["num_workers"], "images": count}


def digests(cfg: dict, base: np.ndarray, count: int, work: Path) -> dict:
    folder = work / "digest"
    folder.mkdir()
    encoded = cv2.imencode(".jpg", cv2.cvtColor(base, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    files = []
    for i in range(count):
        files.append(str(folder / f"{i:05d}.jpg"))
        with open(files[-1], "wb") as handle:
            handle.write(encoded[:-2] + i.to_bytes(4, "little") + encoded[-2:])  # each file's bytes differ
    local = {**cfg, "data": {**cfg["data"], "root": str(work), "cache_dir": str(work / "cache")}}
    pixel_key(local, files[:100])  # warm the workers
    started = time.perf_counter()
    pixel_key(local, files)
    digest_s = time.perf_counter() - started
    started = time.perf_counter()
    [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    stat_s = time.perf_counter() - started
    return {"files": count, "bytes_each": len(encoded) + 4, "digest_s": round(digest_s, 2), "stat_s": round(stat_s, 2),
            "workers": cfg["data"]["num_workers"], "full_data_digest_s": round(digest_s * FULL_DATA / count, 1)}


def hard_faces(cfg: dict, base: np.ndarray) -> dict:
    face = detect_faces([base], {**cfg["faces"], "detect_scale": 1.0})[0][0]
    placements = [(height, x, y, tilt) for height in (200, 340, 520) for x, y in ((0.2, 0.3), (0.5, 0.5), (0.8, 0.6))
                  for tilt in (-12, 0, 12)]
    result = {}
    for kind in ("none", "incorrect", "worn"):
        photo = painted_mask(base, face, kind)
        found = scores = 0
        for height, fx, fy, tilt in placements:
            frame = np.full((720, 1280, 3), 110, np.uint8)
            scale = height / photo.shape[0]
            small = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            rotation = cv2.getRotationMatrix2D((small.shape[1] / 2, small.shape[0] / 2), tilt, 1.0)
            small = cv2.warpAffine(small, rotation, (small.shape[1], small.shape[0]), borderMode=cv2.BORDER_REPLICATE)
            x = int(np.clip(fx * 1280 - small.shape[1] / 2, 0, 1280 - small.shape[1]))
            y = int(np.clip(fy * 720 - small.shape[0] / 2, 0, 720 - small.shape[0]))
            frame[y:y + small.shape[0], x:x + small.shape[1]] = small
            faces = detect_faces([frame], cfg["faces"])[0]
            centre = (x + small.shape[1] / 2, y + small.shape[0] / 2)
            hit = [f for f in faces if abs((f.box[0] + f.box[2]) / 2 - centre[0]) < small.shape[1] / 2
                   and abs((f.box[1] + f.box[3]) / 2 - centre[1]) < small.shape[0] / 2]
            found += bool(hit)
            scores += max((f.score for f in hit), default=0.0)
        result[kind] = {"frames": len(placements), "found": found, "mean_best_score": round(scores / len(placements), 3)}
    portrait_sized = competition_sized(base)
    competition = {}
    for kind in ("none", "incorrect", "worn"):
        face384 = detect_faces([portrait_sized], {**cfg["faces"], "detect_scale": 1.0})[0][0]
        photo = painted_mask(portrait_sized, face384, kind)
        faces = detect_faces([photo], cfg["faces"])[0]
        competition[kind] = round(faces[0].score, 4) if faces else None
    return {"in_frames": result, "score_at_384x512": competition}


def crop_difference(cfg: dict, base: np.ndarray) -> dict:
    """The detect-mode crop (data.crop.margin, data.image_size's aspect) cut from MTCNN's box and from BlazeFace's
    on the 384x512 portrait, bare and with each painted mask: each edge's distance in source pixels, and the two
    crops' IoU. The faces stage and the door use one finder, so this is what switching finder moves."""
    from pipeline.data.crop import crop_box, crop_rule
    from pipeline.gate.events import iou

    rule = crop_rule({**cfg, "data": {**cfg["data"], "crop": {**cfg["data"]["crop"], "mode": "detect"}}})
    face = detect_faces([base], {**cfg["faces"], "finder": "mtcnn", "detect_scale": 1.0})[0][0]
    rows = {}
    for kind in ("none", "incorrect", "worn"):
        photo = painted_mask(base, face, kind)
        crops, scores = {}, {}
        for finder in ("mtcnn", "blazeface"):
            found = detect_faces([photo], {**cfg["faces"], "finder": finder})[0]
            crops[finder] = crop_box(photo.shape[1], photo.shape[0], rule, found[0].box if found else None)
            scores[finder] = round(found[0].score, 3) if found else None
        edges = np.abs(np.subtract(crops["mtcnn"], crops["blazeface"]))
        rows[kind] = {"mtcnn": list(crops["mtcnn"]), "blazeface": list(crops["blazeface"]), "scores": scores,
                      "edge_px": edges.tolist(), "max_edge_px": int(edges.max()),
                      "iou": round(iou(crops["mtcnn"], crops["blazeface"]), 3)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="configs/demo.yaml")
    parser.add_argument("--images", type=int, default=96, help="photos per speed measurement")
    parser.add_argument("--digest-files", type=int, default=31_500)
    parser.add_argument("--out", help="write the tables as JSON here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    base = competition_sized(portrait())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {"machine": f"{os.cpu_count()} cores", "speed": speed(cfg, base, args.images, work)}
        results["digests"] = digests(cfg, base, args.digest_files, work)
    results["hard_faces"] = hard_faces(cfg, portrait())
    results["crops"] = crop_difference(cfg, base)
    print(f"\nMTCNN on {results['speed']['images']} 384x512 photos ({results['machine']}):")
    print(f"{'scale':>6} {'img/s/process':>14} {'box shift px':>13} {'31,500 img, 2 cores':>20} {'16 cores':>9}")
    for scale, row in results["speed"]["by_scale"].items():
        print(f"{scale:>6} {row['images_per_s_one_process']:>14} {row['box_shift_px']:>13} "
              f"{row['full_data_min_2_cores']:>16} min {row['full_data_min_16_cores']:>5} min")
    print(f"faces stage path (detect_files, {results['speed']['workers']} workers, scale "
          f"{cfg['faces']['detect_scale']}): {results['speed']['detect_files_images_per_s']} img/s")
    d = results["digests"]
    print(f"\npixel key of {d['files']} files of {d['bytes_each']} bytes: SHA-256 {d['digest_s']} s on {d['workers']} "
          f"workers, stat only {d['stat_s']} s; full data {d['full_data_digest_s']} s")
    print("\nmasked faces in 1280x720 frames (3 sizes x 3 places x 3 tilts):")
    for kind, row in results["hard_faces"]["in_frames"].items():
        print(f"  {kind:<10} found {row['found']}/{row['frames']}  mean best score {row['mean_best_score']}")
    print("  best score at 384x512, detect_scale", cfg["faces"]["detect_scale"], results["hard_faces"]["score_at_384x512"])
    print(f"\nthe detect-mode crop from MTCNN's box and from BlazeFace's, 384x512 portrait (x0, y0, x1, y1 px):")
    for kind, row in results["crops"].items():
        print(f"  {kind:<10} mtcnn {row['mtcnn']}  blazeface {row['blazeface']}  edges {row['edge_px']} px  "
              f"IoU {row['iou']}  scores {row['scores']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
