"""Test-time views: their names, how a name is read, and what each does to a batch.

The one owner of the views: the config schema reads `parse` to check `infer.tta` at load, and inference
applies them with `tta_views`. No torch at import (torch is imported where a view is applied), so the
schema, which every stage loads first, stays quick.
"""
from __future__ import annotations

import math

FIXED = ("none", "hflip")  # views without a parameter
SCALE = "scale:"           # scale:<factor>, a bilinear resize of the batch
SCALE_RANGE = (0.5, 2.0)   # a factor outside it is a typo (the probe loaded scale:1e9), not a view
ALLOWED = f"{', '.join(FIXED)} or {SCALE}<factor in [{SCALE_RANGE[0]}, {SCALE_RANGE[1]}]>"


def parse(name) -> tuple[str, float | None]:
    """('none' | 'hflip', None) or ('scale', factor); ValueError naming the view otherwise."""
    if name in FIXED:
        return name, None
    if isinstance(name, str) and name.startswith(SCALE):
        try:
            factor = float(name.removeprefix(SCALE))
        except ValueError:
            factor = math.nan
        if math.isfinite(factor) and SCALE_RANGE[0] <= factor <= SCALE_RANGE[1]:
            return "scale", factor
    raise ValueError(f"unknown view {name!r} ({ALLOWED})")


def resizes(name) -> bool:
    """Whether a view changes the input size (a fixed-size backbone cannot take it)."""
    kind, factor = parse(name)
    return kind == "scale" and factor != 1.0


def tta_views(x, tta) -> list:
    """The views of a normalised NCHW batch, in the order of `tta`."""
    import torch
    import torch.nn.functional as F

    views = []
    for name in tta:
        kind, factor = parse(name)
        if kind == "none":
            views.append(x)
        elif kind == "hflip":
            views.append(torch.flip(x, dims=[3]))
        else:
            views.append(F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False))
    return views
