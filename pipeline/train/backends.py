"""The device a training or an inference job runs on, set up the same way for both. On CUDA: cuDNN's autotuner
(train.cudnn_benchmark: the fastest convolution algorithm per input shape, found in the first batches) and TF32
for float32 matmuls and convolutions (train.tf32: what autocast leaves in float32, and everything with
train.precision: fp32). The legacy switches, not torch's fp32_precision ones: mixing the two is an error in torch,
and other libraries still read the legacy ones."""
from __future__ import annotations

import torch

from pipeline.train.model import resolve_device


def job_device(cfg: dict) -> torch.device:
    """train.device, resolved; on CUDA with the settings above."""
    device = resolve_device(cfg["train"]["device"])
    if device.type == "cuda":
        cuda_settings(cfg)
    return device


def cuda_settings(cfg: dict) -> None:
    t = cfg["train"]
    torch.backends.cudnn.benchmark = t["cudnn_benchmark"]
    torch.set_float32_matmul_precision("high" if t["tf32"] else "highest")
    torch.backends.cudnn.allow_tf32 = t["tf32"]
