"""The gate's runtime: load a bundle (pipeline/gate/export.py) and predict on photos and camera frames with
onnxruntime, numpy and OpenCV only. It never imports torch, timm or the training code (a test runs it
with torch made unimportable), so a bundle folder plus these few modules is all a door camera needs.

    gate = Gate("runs/demo/bundle")
    for face in gate.predict(rgb_image):            # every face in the frame
        print(face["box"], face["verdict"], face["heads"]["mask"])
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import cv2
import numpy as np

from pipeline import labels
from pipeline.artifacts import STAMP
from pipeline.data.crop import crop_and_resize, crop_box, face_crop_box
from pipeline.data.blazeface import BlazeFace
from pipeline.data.mtcnn import NETS, find_faces
from pipeline.evaluate.decision import decide  # numpy only: the submission's own rule
from pipeline.errors import MaskfoldError

FORMAT, VERSION = "maskfold-bundle", 1  # the bundle format this runtime reads (pipeline/gate/export.py writes it)
VERDICTS = ("ok", "incorrect", "no_mask")  # by the mask head's class: worn, worn wrongly, not worn


class BundleError(MaskfoldError, ValueError):
    """A bundle this runtime cannot use; the message names the file and the field."""


class ImageError(MaskfoldError, ValueError):
    """Bytes that are not an image this gate takes; the message is one line a client can read."""


def class_names() -> list[str]:
    """The 18 classes in class order as 'mask/gender/age': what this runtime's arithmetic assumes."""
    return [f"{labels.MASK_NAMES[m]}/{labels.GENDER_NAMES[g]}/{labels.AGE_NAMES[a]}"
            for m, g, a in (labels.decompose(c) for c in range(labels.NUM_CLASSES))]


def _digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:16]


class Gate:
    """A loaded bundle: its ensemble graph, its face finder and the crop rule it was trained with."""

    def __init__(self, folder, threads: int = 2, min_face: int | None = None):
        import onnxruntime as ort

        self.link = Path(folder)  # `bundle`, a link export switches to each new version in one rename
        self.folder = self.link.resolve()  # this version's folder: every file below is read from it, never a mix
        manifest_path = self.folder / "bundle.json"
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise BundleError(f"{manifest_path}: not found; is {self.folder} a bundle? (./run.sh export)") from None
        except (OSError, ValueError) as error:
            raise BundleError(f"{manifest_path}: unreadable ({str(error)[:200]})") from error
        self._check_manifest(manifest_path)
        try:
            self.stamp = json.loads((self.folder / STAMP).read_text()).get("token")
        except (OSError, ValueError):
            self.stamp = None  # a bundle copied without its stamp still runs; /health says it has none
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        graph = self.folder / self.manifest["graph"]
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self._check_graph(graph)
        self.size = tuple(self.manifest["input"]["size"])
        self.rule = self.manifest["crop"]
        # a door's faces are large: a bigger smallest face makes the face finder's pyramid, and a frame, cheaper
        self.faces_cfg = {**self.manifest["faces"], **({"min_face": min_face} if min_face else {})}
        self.nets = self.folder / "mtcnn"
        self.finder = self.faces_cfg.get("finder", "mtcnn")  # a bundle from before faces.finder: MTCNN
        self.blazeface = BlazeFace(self.folder / self.manifest["blazeface"]) if self.finder == "blazeface" else None
        self.threads, self.min_face = threads, min_face

    def _check_manifest(self, path: Path) -> None:
        m = self.manifest
        expected = {"format": FORMAT, "version": VERSION, "classes": class_names(),
                    "heads": {"mask": list(labels.MASK_NAMES), "gender": [labels.GENDER_NAMES[g] for g in (0, 1)],
                              "age": list(labels.AGE_NAMES)}}
        for field, value in expected.items():
            if m.get(field) != value:
                raise BundleError(f"{path}: field '{field}' is {str(m.get(field))[:120]!r}; this runtime reads "
                                  f"{str(value)[:120]!r} (a bundle made for other classes or another format)")
        size = m.get("input", {}).get("size")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v >= 16 for v in size)):
            raise BundleError(f"{path}: field 'input.size' is {size!r}, not [w, h]")
        for name, digest in m.get("files", {}).items():
            file = self.folder / name
            if not file.is_file():
                raise BundleError(f"{path}: its file {file} is missing")
            if _digest(file) != digest:
                raise BundleError(f"{path}: {file} is not the file it was exported with (its digest differs)")
        missing = [n for n in (m.get("graph"), *(f"mtcnn/{k}.onnx" for k in NETS)) if n not in m.get("files", {})]
        if missing:
            raise BundleError(f"{path}: field 'files' does not list {', '.join(map(str, missing))}")

    def _check_graph(self, graph: Path) -> None:
        shape = self.session.get_inputs()[0].shape  # [batch, h, w, 3]
        width, height = self.manifest["input"]["size"]
        if list(shape[1:]) != [height, width, 3]:
            raise BundleError(f"{self.folder / 'bundle.json'}: field 'input.size' is [{width}, {height}] but "
                              f"{graph} takes {shape[1:]} (h, w, channels)")

    # ---------------------------------------------------------------- predicting

    def classify(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """The ensemble's probabilities of uint8 RGB crops (n, h, w, 3) at the input size: per head and joint."""
        if len(crops) == 0:
            return {key: np.zeros((0, b - a), np.float32) for key, (a, b) in self.manifest["outputs"].items()}
        out = self.session.run(None, {self.session.get_inputs()[0].name: np.ascontiguousarray(crops, np.uint8)})[0]
        return {key: out[:, a:b] for key, (a, b) in self.manifest["outputs"].items()}

    def _decide(self, joint: np.ndarray) -> np.ndarray:
        """The ensemble's decision rule, as the submission made it: argmax, or with per-class offsets."""
        offsets = (self.manifest.get("decision") or {}).get("offsets")
        return decide(joint, None if offsets is None else np.asarray(offsets))

    def find_faces(self, image: np.ndarray):
        f = self.faces_cfg
        if self.blazeface is not None:  # one resize to its 256 px input, one run: about 10 ms a 1280x720 frame
            return self.blazeface.find(image, f["blazeface_min_score"], f["min_face"])
        # one thread: MTCNN's many small runs got slower with two (73 ms -> 129 ms on a 640x360 frame here)
        return find_faces(image, self.nets, f["detect_scale"], f["min_face"], f["min_score"], threads=1)

    def crops(self, image: np.ndarray, faces: str = "all") -> list[dict]:
        """Where to look: `all`, every face found, each cropped by the face rule (margins, aspect);
        `rule`, exactly the training crop of a portrait (the fixed box, or in detect mode its largest face,
        else the fixed box), one per image."""
        height, width = image.shape[:2]
        found = self.find_faces(image) if faces == "all" or self.rule["mode"] == "detect" else []
        if faces == "all":
            return [{"box": list(f.box), "score": f.score, "source": "detector",
                     "crop": face_crop_box(f.box, width, height, self.rule.get("margin", [0.15, 0.2, 0.15, 0.35]),
                                           self.rule["size"])} for f in found]
        if found:
            face = max(found, key=lambda f: f.area)
            return [{"box": list(face.box), "score": face.score, "source": "detector",
                     "crop": crop_box(width, height, self.rule, face.box)}]
        box = crop_box(width, height, self.rule)
        return [{"box": [float(v) for v in box], "score": None,
                 "source": "fallback" if self.rule["mode"] == "detect" else "fixed", "crop": box}]

    def predict(self, image: np.ndarray, faces: str = "all") -> list[dict]:
        """One record per face (see crops): its box, the crop, the 18-class prediction, each head's class and
        probability, every probability, and the verdict (ok / incorrect / no_mask)."""
        where = self.crops(image, faces)
        batch = np.stack([crop_and_resize(image, w["crop"], self.size) for w in where]) if where else \
            np.zeros((0, self.size[1], self.size[0], 3), np.uint8)
        probs = self.classify(batch)
        names = class_names()
        records = []
        for i, w in enumerate(where):
            joint = int(self._decide(probs["joint"][i:i + 1])[0])
            heads = {}
            for head, head_names in self.manifest["heads"].items():
                k = int(probs[head][i].argmax())
                heads[head] = {"class": head_names[k], "probability": round(float(probs[head][i][k]), 6)}
            mask = int(probs["mask"][i].argmax())
            records.append({**w, "box": [round(float(v), 1) for v in w["box"]], "crop": [int(v) for v in w["crop"]],
                            "class": joint, "class_name": names[joint],
                            "probability": round(float(probs["joint"][i][joint]), 6), "heads": heads,
                            "probabilities": {k: [round(float(v), 6) for v in p[i]] for k, p in probs.items()},
                            "verdict": VERDICTS[mask]})
        return records


# ---------------------------------------------------------------- decoding untrusted bytes

def image_size_from_header(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) read from a PNG or JPEG header without decoding.

    By hand: OpenCV has no header-only read, and its pixel cap (OPENCV_IO_MAX_IMAGE_PIXELS) only applies
    if set before cv2's first import, which a runtime that shares a process cannot promise."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ImageError("a truncated PNG (no IHDR header)")
        width, height = struct.unpack(">II", data[16:24])
        return "png", width, height
    if data[:2] == b"\xff\xd8":
        at = 2
        while at + 9 <= len(data):
            if data[at] != 0xFF:
                raise ImageError("a corrupt JPEG (no marker where one should be)")
            marker = data[at + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                at += 2
                continue
            length = struct.unpack(">H", data[at + 2:at + 4])[0]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                height, width = struct.unpack(">HH", data[at + 5:at + 9])
                return "jpeg", width, height
            at += 2 + length
        raise ImageError("a truncated JPEG (no frame header)")
    raise ImageError("not a JPEG or PNG image")


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """RGB uint8 from the bytes of a JPEG or PNG; an empty, oversized, truncated or non-image body raises
    ImageError with a one-line reason, before any large allocation."""
    if not data:
        raise ImageError("empty body: no image")
    kind, width, height = image_size_from_header(data)
    if width * height > max_pixels:
        raise ImageError(f"{width}x{height} pixels is more than the gate takes ({max_pixels})")
    if width == 0 or height == 0:
        raise ImageError(f"a {kind.upper()} of {width}x{height} pixels")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError(f"a corrupt or truncated {kind.upper()} that OpenCV cannot decode")
    if kind == "jpeg" and data.rfind(b"\xff\xd9") < 4:
        raise ImageError("a truncated JPEG (it ends before its end marker)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
