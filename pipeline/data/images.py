"""Pixels: decode, face-crop and resize once, in parallel; cache the uint8 result on disk.

The cache is the one source of pixels for training, validation and inference, keyed by the image
set's identity (the files' bytes and, when cropping by detection, the boxes table) plus the crop rule
and the size, so new data, a replaced image or a new crop never reuses it.
"""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import cv2
import numpy as np
from joblib import delayed
from PIL import Image

from pipeline.data.crop import crop_and_resize, crop_box, crop_rule
from pipeline.errors import DataError
from pipeline.io import atomic_write_bytes, parallel, stable_hash
from pipeline.progress import progress

cv2.setNumThreads(1)  # parallelism comes from joblib; nested threads only thrash 2 cores
Image.MAX_IMAGE_PIXELS = None  # decode_file applies data.max_image_pixels itself, naming the file and the key


def decode_file(file, max_pixels: int) -> tuple[np.ndarray, str | None]:
    """(RGB uint8, what it was converted from: 'grayscale', 'RGBA', '16-bit RGB', ... or None for 8-bit colour).

    The size is read from the header before decoding, so a small file that claims 30000x30000
    pixels (a decompression bomb) is refused in milliseconds instead of allocating gigabytes.
    OpenCV has no header-only read, and OPENCV_IO_MAX_IMAGE_PIXELS only works if set before cv2 is
    first imported (albumentations imports it too), so Pillow (already here for matplotlib) reads it,
    and its mode says what OpenCV will convert.
    """
    file = str(file)
    try:
        st_mode = os.stat(file).st_mode
    except OSError as error:
        raise DataError([f"{file}: cannot read ({error.strerror or error})"]) from error
    if not stat.S_ISREG(st_mode):  # a FIFO would block the first read forever, /dev/zero never end
        raise DataError([f"{file}: not a regular file (a folder, FIFO or device), not an image"])
    try:
        with Image.open(file) as header:
            (width, height), mode = header.size, header.mode
    except (OSError, ValueError):
        width, height, mode = 0, 0, None  # not something Pillow knows: OpenCV decides below
    if width * height > max_pixels:
        raise DataError([f"{file}: {width}x{height} pixels is more than data.max_image_pixels ({max_pixels}); "
                         f"refusing to decode it"])
    try:
        raw = np.fromfile(file, dtype=np.uint8)
    except OSError as error:
        raise DataError([f"{file}: cannot read ({error.strerror or error})"]) from error
    if raw.size == 0:
        raise DataError([f"{file}: empty file"])
    try:
        image = cv2.imdecode(raw, cv2.IMREAD_COLOR)  # grey, RGBA and 16-bit images become 8-bit BGR
    except cv2.error as error:
        raise DataError([f"{file}: OpenCV cannot decode it ({str(error).strip().splitlines()[-1]})"]) from error
    if image is None:
        raise DataError([f"{file}: corrupt or not a decodable image"])
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), _converted_from(mode, raw)


# Pillow modes that IMREAD_COLOR converts (RGB and YCbCr JPEGs are the normal case: not listed)
_CHANNELS_OF_MODE = {"1": "black-and-white", "L": "grayscale", "I": "grayscale", "F": "grayscale",
                     "LA": "grayscale+alpha", "La": "grayscale+alpha", "RGBA": "RGBA", "RGBa": "RGBA",
                     "P": "palette", "PA": "palette", "CMYK": "CMYK"}
_PNG = b"\x89PNG\r\n\x1a\n"


def _converted_from(mode: str | None, raw: np.ndarray) -> str | None:
    """What IMREAD_COLOR turned into 8-bit RGB, from the Pillow mode and a PNG's bit depth (IHDR byte 24)."""
    if mode is None:
        return None
    channels = _CHANNELS_OF_MODE.get(mode.split(";")[0])
    sixteen = mode.startswith("I;16") or (raw.size > 24 and raw[:8].tobytes() == _PNG and raw[24] == 16)
    if sixteen:
        return f"16-bit {channels or 'RGB'}"
    return channels


def _decode_chunk(files, rule, size, max_pixels: int, faces=None):
    """Decode, crop (pipeline/data/crop.py's rule, around `faces[i]` in detect mode) and resize; with size
    None only decode, to find the files that fail.

    Returns (images, problems, {converted from: [count, first file]})."""
    out, problems, converted = [], [], {}
    for index, file in enumerate(files):
        try:
            image, kind = decode_file(file, max_pixels)
        except DataError as error:
            problems.extend(error.problems)
            image, kind = None, None
        if kind is not None:
            converted.setdefault(kind, [0, file])[0] += 1
        if size is not None:
            face = faces[index] if faces is not None else None
            out.append(np.zeros((size[1], size[0], 3), np.uint8) if image is None else crop_and_resize(
                image, crop_box(image.shape[1], image.shape[0], rule, face), size))
    return out, problems, converted


def decode_images(files, rule, size, max_pixels: int, workers: int = 2, desc: str = "decode",
                  faces=None) -> tuple[np.ndarray, list[str]]:
    """(N, H, W, 3) uint8 images cropped by `rule` (crop_rule's dict; around `faces` in detect mode) and
    every problem found, decoded in parallel chunks."""
    files = list(files)
    starts = range(0, len(files), 64)
    results = parallel(workers)(
        delayed(_decode_chunk)(files[i:i + 64], rule, size, max_pixels, None if faces is None else faces[i:i + 64])
        for i in progress(starts, desc=desc, unit="x64img", leave=False))
    problems = [p for _, chunk_problems, _ in results for p in chunk_problems]
    _log_conversions([converted for _, _, converted in results])
    if size is None:
        return np.zeros((0, 0, 0, 3), np.uint8), problems
    images = [image for chunk_images, _, _ in results for image in chunk_images]
    return (np.stack(images) if images else np.zeros((0, size[1], size[0], 3), np.uint8)), problems


def _log_conversions(chunks: list[dict]) -> None:
    """One line per kind of image that was not 8-bit colour: how many, and the first (in file order)."""
    total: dict[str, list] = {}
    for converted in chunks:
        for kind, (count, first) in converted.items():
            total.setdefault(kind, [0, first])[0] += count
    for kind, (count, first) in total.items():
        print(f"[data] {count} {kind} image{'s' if count > 1 else ''} converted to 8-bit RGB (first: {first})")


def verify_images(files, max_pixels: int, workers: int = 2) -> list[str]:
    """Decode every file only to name the missing, empty, oversized or corrupt ones (the check stage)."""
    return decode_images(files, None, None, max_pixels, workers, desc="decode check")[1]


def cache_path(cfg: dict, images) -> Path:
    """Where the decoded images of an image set (pipeline/data/pixels.py) under the config's crop rule are cached."""
    key = stable_hash({"images": images.identity, "crop": crop_rule(cfg)}, length=20)
    return Path(cfg["data"]["cache_dir"]) / f"{key}.npy"


def cached_images(cfg: dict, images, desc: str = "decode") -> np.ndarray:
    """An image set's pixels, cropped and resized: (N, H, W, 3) uint8, decoded once and then read from disk.

    A cache file that is not that array (truncated, zero-filled, another shape, Python objects) is never
    used: it is decoded again and replaced, with a warning naming it."""
    files = list(images.files)
    path = cache_path(cfg, images)
    size = cfg["data"]["image_size"]
    if path.exists():
        cached, problem = _load_cache(path, (len(files), size[1], size[0], 3))
        if cached is not None:
            return cached
        print(f"[data] warning: cache file {path} {problem}; decoding the images again to replace it")
    pixels, problems = decode_images(files, crop_rule(cfg), size, cfg["data"]["max_image_pixels"],
                                     workers=cfg["data"]["num_workers"], desc=desc, faces=images.faces)
    if problems:
        raise DataError(problems)
    buffer = io.BytesIO()
    np.save(buffer, pixels)
    atomic_write_bytes(path, buffer.getvalue())
    return pixels


def _load_cache(path: Path, shape: tuple) -> tuple[np.ndarray | None, str]:
    """(the cached array as a read-only memory map, "") or (None, what is wrong with the file)."""
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:  # numpy words a pickle, a bad header or a short file so
        return None, f"is not a readable .npy array ({str(error).strip()[:200]})"
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape != shape:
        found = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        return None, f"holds {found}, not uint8 {shape}"
    return images, ""
