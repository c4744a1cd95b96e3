"""What the pixels are: a key of every source image's bytes, part of every identity made from them.

The key is a digest of each file's content (SHA-256), listed by its path relative to `data.root`: an
image replaced in place changes it even when its size and modification time are kept (`cp -p`,
`rsync -t`), and a copy of the same data under another root keeps it, so moving the data never
retrains anything. Reading every byte costs seconds on the full data (bench/faces.py measures it);
training costs hours. Each key's manifest (file -> digest) is kept in `<data.cache_dir>/pixels/`, so a
stale message can name the files that changed.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from joblib import delayed

from pipeline.errors import DataError, WriteError
from pipeline.io import atomic_write_json, parallel, stable_hash

MANIFESTS = "pixels"


def relative_to_root(file: str, root) -> str:
    try:
        return os.path.relpath(file, root)
    except ValueError:  # another drive (Windows): keep it whole
        return file


def _digests(files: list[str]) -> list[str]:
    out = []
    for file in files:
        try:
            with open(file, "rb") as handle:
                out.append(hashlib.file_digest(handle, "sha256").hexdigest()[:32])
        except OSError as error:
            raise DataError([f"{file}: cannot read ({error.strerror or error})"]) from error
    return out


def pixel_key(cfg: dict, files) -> str:
    """The key of `files`' bytes, in their order; its manifest is written once to the cache folder."""
    files = [str(f) for f in files]
    root = str(cfg["data"]["root"])
    chunks = [files[i:i + 512] for i in range(0, len(files), 512)]
    workers = min(cfg["data"]["num_workers"], max(len(chunks), 1))
    digests = [d for part in parallel(workers)(delayed(_digests)(chunk) for chunk in chunks) for d in part]
    manifest = dict(zip((relative_to_root(f, root) for f in files), digests))
    key = stable_hash(list(manifest.items()), length=20)
    path = manifest_path(cfg, key)
    if not path.exists():
        try:
            atomic_write_json(path, manifest)
        except WriteError as error:  # it only names changed files in messages: its loss costs no result
            print(f"[data] warning: {error}; stale messages will not name the changed images")
    return key


def manifest_path(cfg: dict, key: str) -> Path:
    return Path(cfg["data"]["cache_dir"]) / MANIFESTS / f"{key}.json"


def _read_manifest(cache_dir, key) -> dict | None:
    try:
        manifest = json.loads((Path(cache_dir) / MANIFESTS / f"{key}.json").read_text())
        return manifest if isinstance(manifest, dict) else None
    except (OSError, ValueError):
        return None


def changed_files(cache_dir, old_key: str, new_key: str, most: int = 3) -> str:
    """'train/images/x/mask1.jpg changed; ...' between two keys' manifests, or '' when one is not kept."""
    old, new = _read_manifest(cache_dir, old_key), _read_manifest(cache_dir, new_key)
    if old is None or new is None:
        return ""
    lines = [f"{name} changed" for name in new if name in old and old[name] != new[name]]
    lines += [f"{name} is new" for name in new if name not in old]
    lines += [f"{name} is gone" for name in old if name not in new]
    text = "; ".join(lines[:most])
    return text + (f"; and {len(lines) - most} more" if len(lines) > most else "")


@dataclass(frozen=True)
class ImageSet:
    """A list of source images as the models see them: their bytes' key and, when cropping by detection,
    the face each is cropped around (None: the fixed box) and the boxes table's token."""
    name: str                    # "train" or "eval"
    files: tuple[str, ...]
    pixels: str
    faces: tuple | None = None   # per file: (x0, y0, x1, y1) source pixels, or None; None in box mode
    boxes: str | None = None     # token of the faces table the boxes came from (detect mode)

    @property
    def identity(self) -> dict:
        """What every artifact made from these images records, and is stale without."""
        return {"pixels": self.pixels, **({"boxes": self.boxes} if self.boxes is not None else {})}


def image_set(cfg: dict, name: str, files) -> ImageSet:
    """The image set of `files`; in detect mode the faces stage's table for them must be there and fresh."""
    files = tuple(str(f) for f in files)
    key = pixel_key(cfg, files)
    if cfg["data"]["crop"]["mode"] != "detect":
        return ImageSet(name, files, key)
    from pipeline.artifacts import BOXES, faces_artifact
    from pipeline.data.faces import chosen_boxes, read_boxes

    artifact = faces_artifact(cfg, name, key)
    stamp = artifact.require()
    boxes = read_boxes(artifact.path(BOXES), cfg["data"]["root"])
    return ImageSet(name, files, key, tuple(chosen_boxes(boxes, list(files))), stamp["token"])
