"""Batches from the decoded uint8 image cache: the epoch's draw order, the two augmentation engines'
batch sources, evaluation batches, and same-label CutMix.

Every batch leaves here as uint8 NHWC on the device (4x fewer bytes than float32 to copy) and becomes
model input in one place, augment.Normalize. The draw order of an epoch comes from a generator seeded
by the epoch seed, and albumentations' randomness per drawn sample from (epoch seed, draw position),
so a batch is the same whatever the number of DataLoader workers and wherever a resumed run restarts.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline import labels


def sample_seed(epoch_seed: int, draw: int) -> int:
    return int(np.random.SeedSequence([epoch_seed, draw]).generate_state(1)[0])


def draw_order(size: int, epoch_seed: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """One epoch's positions: a uniform shuffle, or weighted draws with replacement."""
    generator = torch.Generator().manual_seed(epoch_seed)
    if weights is None:
        return torch.randperm(size, generator=generator)
    return torch.multinomial(weights, size, replacement=True, generator=generator)


def sampler_weights(joint_targets: np.ndarray) -> torch.Tensor:
    """Inverse class frequency per sample, so every class is drawn about equally often."""
    counts = np.bincount(joint_targets, minlength=labels.NUM_CLASSES)
    return torch.tensor(1.0 / counts[joint_targets], dtype=torch.double)


def take(store, rows, device: torch.device) -> torch.Tensor:
    """uint8 NHWC images at `rows` (a tensor on the store's device, or array) on `device`."""
    if isinstance(store, torch.Tensor):
        return store[rows.to(store.device)].to(device, non_blocking=True)
    batch = torch.from_numpy(np.asarray(store[np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows)]))
    return batch.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else batch


def eval_batches(store, rows, device: torch.device, batch_size: int, pad: bool = False):
    """(start, uint8 batch) over `rows` in order; the next batch's copy is queued before this one is used. The rows
    go to the cache's device once, here: a cache resident on the GPU is cut with no host-to-device copy per batch
    (a blocking one, from pageable memory). `pad`: the last batch is filled up to `batch_size` with copies of its
    last row (the caller drops their outputs), so every forward has one shape."""
    on_store = store.device if isinstance(store, torch.Tensor) else "cpu"
    rows, pending = torch.as_tensor(np.asarray(rows), device=on_store), None
    for start in range(0, len(rows), batch_size):
        chosen = rows[start:start + batch_size]
        if pad and 0 < len(chosen) < batch_size:
            chosen = torch.cat([chosen, chosen[-1:].expand(batch_size - len(chosen))])
        batch = (start, take(store, chosen, device))
        if pending is not None:
            yield pending
        pending = batch
    if pending is not None:
        yield pending


class ImageDataset(torch.utils.data.Dataset):
    """The albumentations engine's dataset: item (epoch seed, draw, position) -> (uint8 HWC image, targets).

    `targets` are full-length arrays aligned with `images` (indexed by row, like the images).
    """

    def __init__(self, images: np.ndarray, transform, rows=None, targets: dict | None = None):
        self.images = images  # may be a memory map: rows are read lazily, never copied whole
        self.rows = np.arange(len(images)) if rows is None else np.asarray(rows)
        self.targets = targets or {}
        for name, values in self.targets.items():
            if len(values) != len(images):
                raise ValueError(f"targets[{name!r}] has {len(values)} values for {len(images)} images")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item):
        epoch_seed, draw, index = item
        self.transform.set_random_seed(sample_seed(epoch_seed, draw))
        row = self.rows[index]
        image = self.transform(image=np.asarray(self.images[row]))["image"]
        image = np.require(image, requirements=["C", "W"])  # a cache row with no transform is read-only
        return torch.from_numpy(image), {name: _target(v[row]) for name, v in self.targets.items()}


def _target(value):
    """A label as an int, a teacher's probabilities (distill.teacher) as a float tensor."""
    return int(value) if np.ndim(value) == 0 else torch.from_numpy(np.asarray(value, dtype=np.float32))


class EpochSampler(torch.utils.data.Sampler):
    """The draw order of the epoch set by `set_epoch`, yielding (epoch seed, draw, position)."""

    def __init__(self, size: int, weights: torch.Tensor | None = None):
        self.size, self.weights, self.epoch_seed = size, weights, 0

    def set_epoch(self, epoch_seed: int) -> None:
        self.epoch_seed = epoch_seed

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        seed = self.epoch_seed
        return ((seed, draw, index) for draw, index in enumerate(draw_order(self.size, seed, self.weights).tolist()))


class LoaderBatches:
    """albumentations engine: a DataLoader built once per job, its workers kept across epochs."""

    def __init__(self, dataset: ImageDataset, batch_size: int, workers: int, device: torch.device,
                 weights: torch.Tensor | None = None):
        self.device = device
        self.sampler = EpochSampler(len(dataset), weights)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=device.type == "cuda",
            drop_last=len(dataset) > batch_size)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch_seed: int):
        """(uint8 NHWC batch, targets) on the device, for one epoch."""
        self.sampler.set_epoch(epoch_seed)
        for images, targets in self.loader:
            yield (images.to(self.device, non_blocking=True),
                   {k: v.to(self.device, non_blocking=True) for k, v in targets.items()})


class DeviceBatches:
    """kornia engine: batches cut from the cache resident on the device; no workers, no host round trip."""

    def __init__(self, store, rows: np.ndarray, targets: dict, batch_size: int, device: torch.device,
                 weights: torch.Tensor | None = None):
        self.store, self.device, self.batch_size, self.weights = store, device, batch_size, weights
        self.rows = torch.as_tensor(rows, device=store.device if isinstance(store, torch.Tensor) else "cpu")
        self.targets = {k: torch.as_tensor(np.asarray(v)[rows], device=device) for k, v in targets.items()}
        self.batches = max(len(rows) // batch_size, 1)  # drop the last partial batch, as the loader does

    def __len__(self) -> int:
        return self.batches

    def epoch(self, epoch_seed: int):
        order = draw_order(len(self.rows), epoch_seed, self.weights).to(self.rows.device)  # one copy per epoch
        for step in range(self.batches):
            positions = order[step * self.batch_size:(step + 1) * self.batch_size]
            on_device = positions.to(self.device)  # the same tensor unless the cache stayed on the host
            yield (take(self.store, self.rows[positions], self.device),
                   {k: v[on_device] for k, v in self.targets.items()})


def same_label_cutmix(images: torch.Tensor, label: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """CutMix that only pastes between images with the same label, so the label stays exact.

    Vectorised on the images' device (no host sync): sort by (label, random key) so each label group
    is contiguous in a random order; each member takes its patch from the next member of its group,
    cyclically, so no image is paired with itself; a lone member of its label keeps its image. Each
    image gets its own patch area (25-75 % kept) and position.
    """
    n, _, height, width = images.shape
    device = images.device
    key = label.to(torch.float64) + torch.rand(n, generator=generator, device=device, dtype=torch.float64) * 0.5
    order = key.argsort()
    sorted_label = label[order]
    position = torch.arange(n, device=device)
    starts = torch.ones(n, dtype=torch.bool, device=device)
    starts[1:] = sorted_label[1:] != sorted_label[:-1]
    group_start = torch.where(starts, position, torch.zeros_like(position)).cummax(0).values
    ends = torch.ones(n, dtype=torch.bool, device=device)
    ends[:-1] = starts[1:]
    following = torch.where(ends, group_start, position + 1)  # the next member, wrapping to the group's first
    partners = torch.empty_like(order)
    partners[order] = order[following]
    lam = torch.rand(n, generator=generator, device=device) * 0.5 + 0.25
    cut_h, cut_w = (height * (1 - lam).sqrt()).long(), (width * (1 - lam).sqrt()).long()
    y0 = (torch.rand(n, generator=generator, device=device) * (height - cut_h + 1)).long()
    x0 = (torch.rand(n, generator=generator, device=device) * (width - cut_w + 1)).long()
    ys, xs = torch.arange(height, device=device), torch.arange(width, device=device)
    inside = (((ys[None] >= y0[:, None]) & (ys[None] < (y0 + cut_h)[:, None]))[:, :, None]
              & ((xs[None] >= x0[:, None]) & (xs[None] < (x0 + cut_w)[:, None]))[:, None, :])
    inside &= (partners != position)[:, None, None]
    return torch.where(inside[:, None], images[partners], images)
