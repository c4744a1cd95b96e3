"""The arithmetic a job trains and predicts in (`train.precision`), and the one place that turns it into torch.

    auto   bf16 autocast on a GPU that has bf16 (Ampere and later: A100, H100, RTX 30xx); fp16 autocast with a
           gradient scaler on one that has not (V100, T4, P100: the competition's servers, Kaggle, Colab);
           fp32 on a CPU
    bf16   bf16 autocast; refused on a GPU without bf16, where it would run emulated or not at all
    fp16   fp16 autocast with torch's GradScaler: the loss is scaled up before backward so small gradients
           survive in fp16; a step whose gradients are not finite is skipped (and counted by the train loop),
           and the scale comes down
    fp32   no autocast (TF32 matmuls still follow train.tf32)

The names live here without torch at import, so the config schema reads them from their owner.
"""
from __future__ import annotations

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
AUTO = "auto"


def resolve(name: str, device) -> str:
    """The precision a job on `device` runs in for the configured `name`: bf16, fp16 or fp32."""
    import torch

    from pipeline.errors import ConfigError

    if name not in PRECISIONS:
        raise ConfigError(f"train.precision: unknown precision {name!r} ({', '.join(PRECISIONS)})")
    cuda = device.type == "cuda"
    if name == AUTO:
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError(f"train.precision: bf16, but {torch.cuda.get_device_name(device)} has no bf16; use auto "
                          f"(fp16 with a gradient scaler here) or fp16")
    return name


def autocast(device, precision: str):
    """The autocast context of a resolved precision on `device` (off for fp32)."""
    import torch

    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler(device, precision: str):
    """torch's GradScaler for fp16, else None (bf16 and fp32 have fp32's range: nothing to scale)."""
    import torch

    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
