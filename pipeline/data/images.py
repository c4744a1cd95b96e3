"""Pixels: decode, face-crop and resize once, in parallel; cache the uint8 result on disk.

The cache is the one source of pixels for training, validation and inference, keyed by each
file's path, size and mtime plus the crop and the size, so new data or a new crop never reuses it.
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
from tqdm import tqdm

from pipeline.errors import DataError
from pipeline.io import atomic_write_bytes, parallel, stable_hash

cv2.setNumThreads(1)  # parallelism comes from joblib; nested threads only thrash 2 cores
Image.MAX_IMAGE_PIXELS = None  # decode_file applies data.max_image_pixels itself, naming the file and the key


def read_image(file, max_pixels: int) -> np.ndarray:
    """RGB uint8; a missing, empty, oversized, undecodable or not-a-file file raises naming it."""
    return decode_file(file, max_pixels)[0]


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


def crop_and_resize(image: np.ndarray, crop, size) -> np.ndarray:
    """Face crop by a fractional box (x0, y0, x1, y1), then resize to (w, h)."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = crop
    box = image[int(round(y0 * height)):int(round(y1 * height)), int(round(x0 * width)):int(round(x1 * width))]
    return cv2.resize(box, tuple(size), interpolation=cv2.INTER_AREA)


def _decode_chunk(files, crop, size, max_pixels: int):
    """Decode, crop and resize; with size None only decode, to find the files that fail.

    Returns (images, problems, {converted from: [count, first file]})."""
    out, problems, converted = [], [], {}
    for file in files:
        try:
            image, kind = decode_file(file, max_pixels)
        except DataError as error:
            problems.extend(error.problems)
            image, kind = None, None
        if kind is not None:
            converted.setdefault(kind, [0, file])[0] += 1
        if size is not None:
            out.append(np.zeros((size[1], size[0], 3), np.uint8) if image is None
                       else crop_and_resize(image, crop, size))
    return out, problems, converted


def decode_images(files, crop, size, max_pixels: int, workers: int = 2,
                  desc: str = "decode") -> tuple[np.ndarray, list[str]]:
    """(N, H, W, 3) uint8 images and every problem found, decoded in parallel chunks."""
    files = list(files)
    chunks = [files[i:i + 64] for i in range(0, len(files), 64)]
    results = parallel(workers)(
        delayed(_decode_chunk)(chunk, crop, size, max_pixels) for chunk in tqdm(chunks, desc=desc, unit="x64img", leave=False))
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


def files_key(files) -> str:
    """Identity of a list of image files as they are on disk: path, size and mtime of each."""
    stats = []
    for file in map(str, files):
        try:
            info = os.stat(file)
            stats.append((file, info.st_size, info.st_mtime_ns))
        except OSError:
            stats.append((file, -1, -1))
    return stable_hash(stats, length=20)


def cache_path(cfg: dict, files) -> Path:
    """Where the decoded images of `files` at the config's crop and size are cached."""
    crop, size = cfg["data"]["crop"], cfg["data"]["image_size"]
    key = stable_hash({"files": files_key(files), "crop": crop, "size": size}, length=20)
    return Path(cfg["data"]["cache_dir"]) / f"{key}.npy"


def cached_images(cfg: dict, files, desc: str = "decode") -> np.ndarray:
    """Decoded, face-cropped, resized images (N, H, W, 3) uint8, decoded once and then read from disk.

    A cache file that is not that array (truncated, zero-filled, another shape, Python objects) is never
    used: it is decoded again and replaced, with a warning naming it."""
    files = [str(f) for f in files]
    path = cache_path(cfg, files)
    crop, size = cfg["data"]["crop"], cfg["data"]["image_size"]
    if path.exists():
        cached, problem = _load_cache(path, (len(files), size[1], size[0], 3))
        if cached is not None:
            return cached
        print(f"[data] warning: cache file {path} {problem}; decoding the images again to replace it")
    images, problems = decode_images(files, crop, size, cfg["data"]["max_image_pixels"],
                                     workers=cfg["data"]["num_workers"], desc=desc)
    if problems:
        raise DataError(problems)
    buffer = io.BytesIO()
    np.save(buffer, images)
    atomic_write_bytes(path, buffer.getvalue())
    return images


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
