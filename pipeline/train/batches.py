"""Batches from the decoded-image cache: datasets, the epoch's draw order, same-label CutMix.

Augmentation randomness is seeded per drawn sample from (epoch seed, draw position), so a batch is
the same whatever the number of DataLoader workers and wherever a resumed run restarts.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pipeline import labels


class ImageDataset(torch.utils.data.Dataset):
    """Cached images at `rows` -> (CHW float tensor, targets of that row) through an albumentations transform.

    `targets` are full-length arrays aligned with `images` (indexed by row, like the images). An item
    is a dataset position, or (draw position, dataset position) from EpochSampler, which seeds the
    transform for that one sample.
    """

    def __init__(self, images: np.ndarray, transform, rows=None, targets: dict | None = None):
        self.images = images  # may be a memory map: rows are read lazily, never copied whole
        self.rows = np.arange(len(images)) if rows is None else np.asarray(rows)
        self.targets = targets or {}
        for name, values in self.targets.items():
            if len(values) != len(images):
                raise ValueError(f"targets[{name!r}] has {len(values)} values for {len(images)} images")
        self.transform = transform
        self.epoch_seed: int | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            draw, index = item
            self.transform.set_random_seed(sample_seed(self.epoch_seed, draw))
        else:
            index = item
        row = self.rows[index]
        image = self.transform(image=np.asarray(self.images[row]))["image"]
        return image, {name: int(values[row]) for name, values in self.targets.items()}


def sample_seed(epoch_seed: int, draw: int) -> int:
    return int(np.random.SeedSequence([epoch_seed, draw]).generate_state(1)[0])


class EpochSampler(torch.utils.data.Sampler):
    """One epoch's draw order (uniform shuffle or weighted with replacement), yielding (draw, index)."""

    def __init__(self, size: int, seed: int, weights: torch.Tensor | None = None):
        self.size, self.seed, self.weights = size, seed, weights

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        if self.weights is None:
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        return iter(enumerate(order.tolist()))


def sampler_weights(joint_targets: np.ndarray) -> torch.Tensor:
    """Inverse class frequency per sample, so every class is drawn about equally often."""
    counts = np.bincount(joint_targets, minlength=labels.NUM_CLASSES)
    return torch.tensor(1.0 / counts[joint_targets], dtype=torch.double)


def same_label_cutmix(images: torch.Tensor, label: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """CutMix that only pastes between images with the same label, so the label stays exact.

    Each image of a label group gets its patch from another member: a shuffled order rotated by one
    has no fixed point, so no image is "mixed" with itself.
    """
    mixed = images.clone()
    _, _, height, width = images.shape
    for value in label.unique():
        members = (label == value).nonzero().squeeze(1)
        if len(members) < 2:
            continue
        order = torch.randperm(len(members), generator=generator)
        partner_position = torch.empty_like(order)
        partner_position[order] = order.roll(1)
        partners = members[partner_position]
        lam = float(torch.rand(1, generator=generator)) * 0.5 + 0.25
        cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        y0 = int(torch.randint(0, height - cut_h + 1, (1,), generator=generator))
        x0 = int(torch.randint(0, width - cut_w + 1, (1,), generator=generator))
        mixed[members, :, y0:y0 + cut_h, x0:x0 + cut_w] = images[partners, :, y0:y0 + cut_h, x0:x0 + cut_w]
    return mixed
