"""The augmentation engines and which one a job uses (`augment.engine`).

Their pipelines are built in pipeline/train/augment.py; the names live here, without torch or
albumentations, so that the config schema (loaded first by every stage) reads them from their owner.
"""
from __future__ import annotations

ENGINES = ("albumentations", "kornia")  # albumentations: per image on CPU workers; kornia: per sample on the batch
AUTO = "auto"                           # kornia on CUDA, albumentations elsewhere


def engine(name: str, device_type: str) -> str:
    """The engine a job on `device_type` ('cuda', 'cpu', ...) uses for the configured `name`."""
    if name == AUTO:
        return "kornia" if device_type == "cuda" else "albumentations"
    if name not in ENGINES:
        raise ValueError(f"augment.engine: unknown engine {name!r} ({AUTO}, {', '.join(ENGINES)})")
    return name
