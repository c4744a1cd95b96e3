"""Augmentation and normalisation from config. Training augmentation never reaches validation or inference.

Two engines draw the training augmentation (`augment.engine`):
  albumentations  per image on CPU, in DataLoader workers, from `augment.train` (the CPU default);
  kornia          per sample on the batch, on the GPU, from `augment.gpu` (the CUDA default). Kornia draws
                  each sample's own parameters (same_on_batch=False), which torchvision.transforms.v2
                  does not do on a batch.
Both hand uint8 pixels to `Normalize`, the one place where pixels become the model's float input, so
with every probability at 0 both engines give exactly the evaluation input.
"""
from __future__ import annotations

import difflib

import albumentations as A
import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.schema import _short
from pipeline.train import engines

MESSAGE_LIMIT = 400  # characters of a message that quotes a spec: an expanded YAML alias made a 2.1 GB line


def engine(cfg: dict, device: torch.device) -> str:
    """The configured engine for a job on `device` (pipeline/train/engines.py owns the names)."""
    return engines.engine(cfg["augment"]["engine"], device.type)


def _refused(message: str) -> ConfigError:
    """A ConfigError whose message is cut to MESSAGE_LIMIT characters (the library's own text may quote the spec)."""
    return ConfigError(message if len(message) <= MESSAGE_LIMIT else message[:MESSAGE_LIMIT] + "... (cut)")


def _unknown(kind: str, key: str, name, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(str(name)[:100], valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return _refused(f"{key}: unknown {kind} transform {_short(name)}{hint}")


def _albumentation(spec: dict):
    spec = dict(spec)
    name = spec.pop("name", None)
    if not name or not isinstance(getattr(A, name, None), type):
        valid = [n for n in dir(A) if isinstance(getattr(A, n), type) and issubclass(getattr(A, n), A.BasicTransform)]
        raise _unknown("albumentations", "augment.train", name, valid)
    try:
        # strict: a misspelt or renamed (albumentations 1.x) argument is an error, not a silent default
        return getattr(A, name)(**spec, strict=True)
    except (ValueError, TypeError) as error:
        raise _refused(f"augment.train: {name}({_short(spec)}): {error}") from error


def train_transform(cfg: dict, seed: int | None = None) -> A.Compose:
    """The albumentations engine: uint8 HWC in, uint8 HWC out (normalised later, on the device)."""
    steps = [_albumentation(spec) for spec in cfg["augment"]["train"] or []]
    return A.Compose(steps, seed=seed, strict=True)


def _kornia_step(spec: dict):
    import kornia.augmentation as K

    spec = dict(spec)
    name = spec.pop("name", None)
    kind = getattr(K, str(name), None)
    if not name or not isinstance(kind, type) or not issubclass(kind, K.base._AugmentationBase):
        valid = [n for n in dir(K) if isinstance(getattr(K, n), type) and issubclass(getattr(K, n), K.base._AugmentationBase)]
        raise _unknown("kornia", "augment.gpu", name, valid)
    if spec.get("same_on_batch"):
        raise ConfigError(f"augment.gpu: {name}: same_on_batch must stay false (each sample draws its own parameters)")
    try:
        return kind(**spec, same_on_batch=False)
    except (ValueError, TypeError, AssertionError) as error:
        raise _refused(f"augment.gpu: {name}({_short(spec)}): {error}") from error


def gpu_augmenter(cfg: dict) -> torch.nn.Module | None:
    """The kornia engine: float NCHW in [0, 1] in and out, each sample with its own parameters; None if empty."""
    specs = cfg["augment"]["gpu"] or []
    if not specs:
        return None
    import kornia.augmentation as K

    return K.AugmentationSequential(*[_kornia_step(spec) for spec in specs])


def check_augment(cfg: dict) -> None:
    """Build both engines' pipelines so a bad transform is refused before any work starts."""
    train_transform(cfg)
    if cfg["augment"]["engine"] != "albumentations":
        gpu_augmenter(cfg)


class Normalize(torch.nn.Module):
    """uint8 NHWC batch -> float NCHW model input: optionally augmented (kornia), then normalised.

    The only place pixels become model input, for training, validation and inference alike.
    Normalisation is a per-channel lookup table of albumentations' own Normalize values, so both
    engines and evaluation give bit-identical input for the same pixels (and the same as before the
    GPU path existed).
    The kornia engine's output is rounded back to uint8 first, as albumentations' is, and made NHWC in
    memory again (kornia returns NCHW memory; the uint8 copy is the cheapest place to change it). The
    gather writes in its index's layout, NHWC, so the NCHW view of it is channels_last.
    """

    def __init__(self, cfg: dict, device: torch.device, augmenter: torch.nn.Module | None = None,
                 channels_last: bool = False):
        super().__init__()
        self.augmenter = augmenter
        self.channels_last = channels_last
        every_value = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # (1, 256, 3)
        table = A.Normalize(mean=cfg["augment"]["mean"], std=cfg["augment"]["std"])(image=every_value)["image"]
        self.register_buffer("table", torch.from_numpy(np.ascontiguousarray(table[0].T, np.float32)).reshape(-1))
        self.register_buffer("offsets", torch.arange(3) * 256)
        self.to(device)

    @property
    def device(self) -> torch.device:
        return self.table.device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.augmenter is not None:
            x = self.augmenter(images.permute(0, 3, 1, 2).float() / 255).clamp_(0, 1)
            images = (x * 255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        x = self.table[images.long() + self.offsets].permute(0, 3, 1, 2)  # NCHW view of NHWC memory
        return x if self.channels_last else x.contiguous()
