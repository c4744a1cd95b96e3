"""Albumentations pipelines from config. Training augmentation never reaches validation or inference."""
from __future__ import annotations

import difflib

import albumentations as A
from albumentations.pytorch import ToTensorV2

from pipeline.errors import ConfigError


def _transform(spec: dict):
    spec = dict(spec)
    name = spec.pop("name", None)
    if not name or not isinstance(getattr(A, name, None), type):
        valid = [n for n in dir(A) if isinstance(getattr(A, n), type) and issubclass(getattr(A, n), A.BasicTransform)]
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"augment.train: unknown albumentations transform {name!r}{hint}")
    try:
        # strict: a misspelt or renamed (albumentations 1.x) argument is an error, not a silent default
        return getattr(A, name)(**spec, strict=True)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"augment.train: {name}({spec}): {error}") from error


def _finish(cfg: dict) -> list:
    return [A.Normalize(mean=cfg["augment"]["mean"], std=cfg["augment"]["std"], max_pixel_value=255.0), ToTensorV2()]


def train_transform(cfg: dict, seed: int | None = None) -> A.Compose:
    steps = [_transform(spec) for spec in cfg["augment"]["train"] or []]
    return A.Compose(steps + _finish(cfg), seed=seed, strict=True)


def eval_transform(cfg: dict) -> A.Compose:
    return A.Compose(_finish(cfg), strict=True)
