"""The face finder: MTCNN (facenet-pytorch) on every photo, for training crops and camera frames alike.

`detect_faces` is the one detector call (pipeline.data.mtcnn.find_faces, which the torch-free gate
runtime calls too): the image is shrunk by `faces.detect_scale`, MTCNN runs on it, and every face
scoring at least `faces.min_score` comes back in source pixels with its score and 5 landmarks. The faces stage runs it once per image over `data.num_workers` processes and
writes one boxes table per image set; `choose_faces` then picks the face each training image is
cropped around:

  - several faces: the largest (a portrait's subject fills the frame; a face in the background, or a
    mask pattern taken for one, is smaller);
  - `faces.person_box`: own (each photo's own face), normal (the face found on the person's unmasked
    photo for all 7: a detector finds unmasked faces more reliably) or fill (own, and the unmasked
    photo's face where a photo has none); eval photos have no person, so they always take their own;
  - no face: the fixed box `data.crop.box` (source `fallback`), counted per mask class in the report.

MTCNN's three small networks ship inside the facenet-pytorch wheel (no download); they are exported
to ONNX once into `faces.dir` and run with onnxruntime (pipeline/data/mtcnn.py).
"""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from joblib import delayed

from pipeline.data.crop import PERSON_BOX, fixed_box  # noqa: F401 (PERSON_BOX: person_box's values)
from pipeline.data.images import decode_file
from pipeline.data.mtcnn import LANDMARKS, Face, export_nets, find_faces
from pipeline.io import parallel
from pipeline.progress import progress

LANDMARK_COLUMNS = tuple(f"{name}_{axis}" for name in LANDMARKS for axis in "xy")
COLUMNS = ("file", "width", "height", "face", "x0", "y0", "x1", "y1", "score", *LANDMARK_COLUMNS, "source", "chosen")
SOURCES = ("detector", "normal", "fallback")
# the settings a boxes table depends on (faces.dir and the worker count do not change a box)
SETTINGS = ("finder", "min_score", "blazeface_min_score", "detect_scale", "min_face", "person_box")


def settings(cfg: dict) -> dict:
    return {key: cfg["faces"][key] for key in SETTINGS}


def nets_folder(faces_cfg: dict) -> Path:
    """MTCNN's three networks as ONNX, exported once from the facenet-pytorch wheel into `faces.dir`."""
    return Path(faces_cfg["dir"]) / "mtcnn-onnx"


def detect_faces(images: list[np.ndarray], faces_cfg: dict) -> list[list[Face]]:
    """Every face found in each RGB uint8 image, best score first, in the image's own pixels
    (pipeline.data.mtcnn.find_faces with the config's face finder settings)."""
    if faces_cfg["finder"] == "blazeface":  # the door's finder on the training photos too: one crop at both ends
        finder = _blazeface(faces_cfg)
        return [[_as_mtcnn_landmarks(face) for face in finder.find(image, faces_cfg["blazeface_min_score"],
                                                                   faces_cfg["min_face"])] for image in images]
    folder = nets_folder(faces_cfg)
    export_nets(folder)
    return [find_faces(image, folder, faces_cfg["detect_scale"], faces_cfg["min_face"], faces_cfg["min_score"])
            for image in images]


_BLAZEFACE: dict = {}


def _blazeface(faces_cfg: dict):
    """One BlazeFace per process and faces.dir; its ONNX converted there once (pipeline/data/blazeface.py)."""
    from pipeline.data.blazeface import BlazeFace, onnx_model

    folder = Path(faces_cfg["dir"]) / "blazeface"
    if str(folder) not in _BLAZEFACE:
        _BLAZEFACE[str(folder)] = BlazeFace(onnx_model(folder))
    return _BLAZEFACE[str(folder)]


def _as_mtcnn_landmarks(face: Face) -> Face:
    """BlazeFace's 6 points as the table's 5 (MTCNN's, image-left eye first): its person's right eye is the
    image's left one; it has one mouth point, which both mouth columns hold; its ears are left out."""
    right_eye, left_eye, nose, mouth = face.landmarks[:4]
    return Face(face.box, face.score, (right_eye, left_eye, nose, mouth, mouth))


def _detect_chunk(files: list[str], faces_cfg: dict, max_pixels: int) -> list[dict]:
    images = [decode_file(file, max_pixels)[0] for file in files]
    rows = []
    for file, image, faces in zip(files, images, detect_faces(images, faces_cfg)):
        height, width = image.shape[:2]
        for index, face in enumerate(faces):
            rows.append(_row(file, width, height, index, face.box, face.score, face.landmarks, "detector"))
        if not faces:
            rows.append(_row(file, width, height, -1, None, np.nan, None, "fallback"))
    return rows


def _row(file, width, height, face, box, score, landmarks, source) -> dict:
    x0, y0, x1, y1 = box if box is not None else (np.nan,) * 4
    points = [v for point in landmarks for v in point] if landmarks is not None else [np.nan] * 10
    return {"file": file, "width": width, "height": height, "face": face, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
            "score": score, **dict(zip(LANDMARK_COLUMNS, points)), "source": source, "chosen": False}


def detect_files(files: list[str], cfg: dict, desc: str = "faces") -> tuple[pd.DataFrame, float]:
    """One row per face found in each file (a `fallback` row where none is), in file order; and the
    detection rate in images per second of all workers together."""
    if cfg["faces"]["finder"] == "blazeface":
        _blazeface(cfg["faces"])  # converted once, here, before the workers read the file
    export_nets(nets_folder(cfg["faces"]))  # once, here, before the workers read the files
    started = time.perf_counter()
    chunks = [files[i:i + 32] for i in range(0, len(files), 32)]
    results = parallel(cfg["data"]["num_workers"])(
        delayed(_detect_chunk)(chunk, cfg["faces"], cfg["data"]["max_image_pixels"])
        for chunk in progress(chunks, desc=desc, unit="x32img", leave=False))
    rate = len(files) / max(time.perf_counter() - started, 1e-9)
    rows = [row for chunk_rows in results for row in chunk_rows]
    return pd.DataFrame(rows, columns=list(COLUMNS)), rate


def choose_faces(boxes: pd.DataFrame, crop_box, person_box: str, people: pd.DataFrame | None = None) -> pd.DataFrame:
    """Mark the row each image is cropped by (`chosen`): its largest face; per `person_box`, the unmasked
    photo's face (a row with source `normal`); else its `fallback` row, which gets the fixed box `crop_box`
    (fractions) in pixels. `people`: file, person_id and stem of each training image (None for eval)."""
    boxes = boxes.copy()
    boxes["chosen"] = False
    area = (boxes["x1"] - boxes["x0"]) * (boxes["y1"] - boxes["y0"])
    detected = boxes[boxes["source"] == "detector"]
    largest = area[detected.index].groupby(detected["file"]).idxmax()
    normal_face = {}
    if people is not None and person_box != "own":
        normal_files = people.loc[people["stem"] == "normal", ["person_id", "file"]]
        normal_face = {pid: largest[file] for pid, file in normal_files.itertuples(index=False) if file in largest}
    person_of = dict(zip(people["file"], people["person_id"])) if people is not None else {}
    extra = []
    for file, rows in boxes.groupby("file", sort=False).groups.items():
        own = largest.get(file)
        borrowed = normal_face.get(person_of.get(file))
        use_normal = borrowed is not None and (person_box == "normal" or own is None) and borrowed not in rows
        if use_normal:
            row = boxes.loc[borrowed].copy()
            first = boxes.loc[rows[0]]
            row[["file", "width", "height", "face", "source", "chosen"]] = [file, first["width"], first["height"],
                                                                         -1, "normal", True]
            extra.append(row)
        elif own is not None:
            boxes.at[own, "chosen"] = True
        else:
            fallback = rows[boxes.loc[rows, "source"].eq("fallback").to_numpy()][0]
            width, height = int(boxes.at[fallback, "width"]), int(boxes.at[fallback, "height"])
            boxes.loc[fallback, ["x0", "y0", "x1", "y1"]] = [float(v) for v in fixed_box(width, height, crop_box)]
            boxes.at[fallback, "chosen"] = True
    if extra:
        boxes = pd.concat([boxes, pd.DataFrame(extra)], ignore_index=True)
    # a photo that borrowed the unmasked face keeps no `fallback` row: it has a face to crop by
    borrowed_files = {row["file"] for row in extra}
    boxes = boxes[~(boxes["source"].eq("fallback") & boxes["file"].isin(borrowed_files))]
    order = {file: i for i, file in enumerate(dict.fromkeys(boxes["file"]))}
    return boxes.sort_values(["file", "face"], key=lambda c: c.map(order) if c.name == "file" else c,
                             kind="stable").reset_index(drop=True)


def chosen_boxes(boxes: pd.DataFrame, files: list[str]) -> list[tuple | None]:
    """Per file, in `files` order: the face box to crop around, or None to take the fixed box (a fallback)."""
    chosen = boxes[boxes["chosen"]].set_index("file")
    missing = [f for f in files if f not in chosen.index]
    if missing:
        raise KeyError(f"no chosen box for {len(missing)} image(s), e.g. {missing[0]}")
    out = []
    for file in files:
        row = chosen.loc[file]
        out.append(None if row["source"] == "fallback" else (row["x0"], row["y0"], row["x1"], row["y1"]))
    return out


def write_boxes(boxes: pd.DataFrame, path, root) -> None:
    """The boxes table as CSV, files relative to `root` (data.root), so the table stays true when the data moves."""
    from pipeline.data.pixels import relative_to_root
    from pipeline.io import atomic_write_text

    table = boxes.assign(file=[relative_to_root(f, root) for f in boxes["file"]], chosen=boxes["chosen"].astype(int))
    atomic_write_text(path, table.to_csv(index=False, float_format="%.2f", lineterminator="\n"))


def read_boxes(path, root) -> pd.DataFrame:
    """A boxes table, files joined to `root` again."""
    from pathlib import Path

    boxes = pd.read_csv(path, keep_default_na=True)
    boxes["file"] = [str(Path(root) / f) for f in boxes["file"]]
    boxes["chosen"] = boxes["chosen"].astype(bool)
    return boxes


# ---------------------------------------------------------------- looking at it

_GREEN, _YELLOW, _RED, _WHITE = (40, 200, 40), (255, 210, 0), (230, 40, 40), (255, 255, 255)


def draw_image(image: np.ndarray, rows: pd.DataFrame, rule: dict, caption: str, height: int = 128) -> np.ndarray:
    """A thumbnail of one photo: every face found (green, with its score), the crop the models see
    (yellow; red when it is the fallback box) and a caption."""
    from pipeline.data.crop import crop_box

    scale = height / image.shape[0]
    thumb = cv2.resize(image, (max(round(image.shape[1] * scale), 1), height), interpolation=cv2.INTER_AREA)
    for row in rows.itertuples(index=False):
        if row.source == "detector":
            p0, p1 = (round(row.x0 * scale), round(row.y0 * scale)), (round(row.x1 * scale), round(row.y1 * scale))
            cv2.rectangle(thumb, p0, p1, _GREEN, 1)
            cv2.putText(thumb, f"{row.score:.2f}", (p0[0], max(p0[1] - 2, 8)), cv2.FONT_HERSHEY_SIMPLEX, 0.3, _GREEN, 1)
    chosen = rows[rows["chosen"]]
    if len(chosen):
        row = chosen.iloc[0]
        face = None if row["source"] == "fallback" else (row["x0"], row["y0"], row["x1"], row["y1"])
        x0, y0, x1, y1 = crop_box(image.shape[1], image.shape[0], rule, face)
        colour = _RED if row["source"] == "fallback" else _YELLOW
        cv2.rectangle(thumb, (round(x0 * scale), round(y0 * scale)), (round(x1 * scale) - 1, round(y1 * scale) - 1),
                      colour, 2 if colour == _RED else 1)
    cv2.rectangle(thumb, (0, height - 12), (thumb.shape[1], height), (0, 0, 0), -1)
    cv2.putText(thumb, caption[:28], (2, height - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.3, _WHITE, 1)
    return thumb


def contact_sheet(groups: list[tuple[str, list[str]]], boxes: pd.DataFrame, rule: dict, max_pixels: int,
                  captions: dict, columns: int = 7, height: int = 128) -> np.ndarray:
    """One RGB sheet: a titled row of thumbnails (draw_image) per group of files, wrapped at `columns`."""
    by_file = {file: rows for file, rows in boxes.groupby("file", sort=False)}
    width = round(height * 0.75) + 4
    rows_out = []
    for title, files in groups:
        banner = np.zeros((16, columns * width, 3), np.uint8)
        cv2.putText(banner, title[:120], (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, _WHITE, 1)
        rows_out.append(banner)
        for start in range(0, max(len(files), 1), columns):
            strip = np.full((height + 4, columns * width, 3), 30, np.uint8)
            for column, file in enumerate(files[start:start + columns]):
                image = decode_file(file, max_pixels)[0]
                thumb = draw_image(image, by_file.get(file, boxes.iloc[:0]), rule, captions.get(file, ""), height)
                thumb = thumb[:, :width - 4]
                strip[2:2 + height, column * width + 2:column * width + 2 + thumb.shape[1]] = thumb
            rows_out.append(strip)
    return np.concatenate(rows_out) if rows_out else np.zeros((16, columns * width, 3), np.uint8)
