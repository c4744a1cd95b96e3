"""Models from timm's factory plus one linear layer holding every head's logits (see labels)."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
import torch.nn as nn

from pipeline import labels
from pipeline.errors import ConfigError, MaskfoldError
from pipeline.train import views


class MaskNet(nn.Module):
    """timm backbone (no classifier) + one linear layer: the heads' logits side by side, or 18."""

    def __init__(self, backbone: str, head: str = "multihead", pretrained=False, pretrained_file=None,
                 drop_rate: float = 0.0, image_size=None, heads=tuple(labels.HEADS)):
        super().__init__()
        if head not in labels.HEAD_KINDS:
            raise ConfigError(f"model.head {head!r} is not one of {', '.join(labels.HEAD_KINDS)}")
        if problems := backbone_problems(backbone, pretrained_file):
            raise ConfigError("model.backbones / model.pretrained_files: " + "; ".join(problems))
        kwargs = size_kwargs(backbone, image_size)
        if pretrained_file:
            pretrained = True
        elif pretrained:
            pretrained_file = cached_weights(backbone)  # None: the hub is reachable and timm downloads them
        if pretrained_file:
            # timm resolves the local file through its normal pretrained path: no network
            kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_file))
        try:
            self.backbone = timm.create_model(backbone, pretrained=bool(pretrained), num_classes=0, **kwargs)
        except (RuntimeError, ValueError, OSError, KeyError) as error:
            if not pretrained_file:
                raise
            raise ConfigError(f"model.pretrained_files: {pretrained_file} holds no usable {backbone} weights "
                              f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from error
        if pretrained_file:
            _check_loaded(self.backbone, pretrained_file, backbone)
        self.head_kind = head
        self.heads = tuple(heads)  # the heads it predicts (model.tasks: a per-task model has some only)
        outputs = labels.num_outputs(head, self.heads)
        # pooled feature width: head_hidden_size where the model has a pre-logits layer (e.g. MobileNetV3)
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(width, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _check_loaded(model: nn.Module, pretrained_file, backbone: str) -> None:
    """timm loads the weights of a model built without its classifier non-strictly, so a file made for
    another architecture loads nothing and leaves random weights without a word. Refuse a file that
    holds under half of the backbone's tensors (by name and shape; a resampled position embedding
    differs in shape and is the only expected miss)."""
    from timm.models import load_state_dict  # weights_only=True, safetensors or torch files

    saved = load_state_dict(str(pretrained_file))
    own = model.state_dict()
    found = sum(1 for name, tensor in own.items() if name in saved and tuple(saved[name].shape) == tuple(tensor.shape))
    if found < len(own) / 2:
        raise ConfigError(f"model.pretrained_files: {pretrained_file} holds no usable {backbone} weights (only {found} "
                          f"of its {len(own)} tensors are in the file): is it a timm state dict of {backbone}?")


def build_model(cfg: dict, backbone: str, for_inference: bool = False) -> MaskNet:
    model_cfg = cfg["model"]
    pretrained_file = None if for_inference else model_cfg["pretrained_files"].get(backbone)
    pretrained = False if for_inference else model_cfg["pretrained"]
    return MaskNet(backbone, model_cfg["head"], pretrained, pretrained_file, model_cfg["drop_rate"],
                   image_size=cfg["data"]["image_size"], heads=labels.model_heads(model_cfg["tasks"], backbone))


def size_kwargs(backbone: str, image_size) -> dict:
    """timm arguments that build `backbone` for the input size (w, h): `img_size` for models whose
    pretrained config says their input size is fixed (ViT, Swin, ...), nothing for convolutional ones."""
    pretrained_cfg = timm.get_pretrained_cfg(backbone)
    if image_size is None or not (pretrained_cfg and pretrained_cfg.fixed_input_size):
        return {}
    width, height = image_size
    return {"img_size": (height, width)}


def check_input_size(cfg: dict, backbone: str) -> None:
    """Build `backbone` for data.image_size on the meta device (no memory, no weights) and run one forward;
    refuse the config naming the backbone and the sizes it accepts if that fails."""
    width, height = cfg["data"]["image_size"]
    model = None
    try:
        with torch.device("meta"):
            model = timm.create_model(backbone, pretrained=False, num_classes=0, **size_kwargs(backbone, (width, height)))
            model(torch.zeros(1, 3, height, width))
    except Exception as error:  # noqa: BLE001 - any failure here means "this size does not work"
        pretrained_cfg = timm.get_pretrained_cfg(backbone)
        native = pretrained_cfg.input_size[1:] if pretrained_cfg else None
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        fixed = bool(pretrained_cfg and pretrained_cfg.fixed_input_size)
        accepts = (f"its native size {native[1]}x{native[0]} (w x h)" if fixed and native else
                   f"sizes that are multiples of its patch size {tuple(patch)}" if patch else "other sizes")
        raise ConfigError(f"model.backbones: {backbone} cannot take data.image_size {width}x{height} (w x h): "
                          f"{type(error).__name__}: {str(error).splitlines()[0][:200]}; it accepts {accepts}") from error


def cached_weights(backbone: str, timeout_s: float = 3.0) -> str | None:
    """Pretrained weights without waiting on a network that is not there.

    The local hub cache first (a path: timm loads it with no network); else, if the hub answers
    within seconds, None (timm downloads as usual); else a ConfigError naming model.pretrained_files.
    huggingface_hub retries an unreachable hub for about 45 s before failing, hence this check.
    """
    pretrained_cfg = timm.get_pretrained_cfg(backbone)
    if pretrained_cfg is None:
        raise ConfigError(f"model.pretrained: timm has no pretrained weights for {backbone}; "
                          f"set model.pretrained: false or name a file in model.pretrained_files")
    import huggingface_hub

    if pretrained_cfg.hf_hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = huggingface_hub.try_to_load_from_cache(pretrained_cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return found
        host = urlparse(huggingface_hub.constants.ENDPOINT).hostname
    else:
        local = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(pretrained_cfg.url or "").path).name
        if pretrained_cfg.url and local.is_file():
            return str(local)
        host = urlparse(pretrained_cfg.url or "").hostname
    offline = huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    if host and not offline:
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            return None
        except OSError:
            pass
    raise ConfigError(
        f"model.pretrained: true, but the weights of {backbone} are not in the local cache and the hub ({host}) "
        f"cannot be reached{' (HF_HUB_OFFLINE is set)' if offline else ''}. Download them where you are online, "
        f"or set model.pretrained_files: {{{backbone}: /path/to/weights.safetensors}}, or model.pretrained: false")


def prepare_model(cfg: dict, model: nn.Module, device: torch.device) -> nn.Module:
    """On the device; channels_last on CUDA when train.channels_last (the input is made to match)."""
    model = model.to(device)
    if device.type == "cuda" and cfg["train"]["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    return model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MaskfoldError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def check_tta(cfg: dict, backbone: str) -> None:
    """A scale TTA view resizes the input; a backbone whose input size is fixed (ViT, Swin, ...) cannot take
    it, and would only crash at the infer stage, after all the training: refuse it before."""
    pretrained_cfg = timm.get_pretrained_cfg(backbone)
    scaled = [v for v in cfg["infer"]["tta"] if views.resizes(v)]
    if scaled and pretrained_cfg and pretrained_cfg.fixed_input_size:
        raise ConfigError(f"model.backbones: {backbone} has a fixed input size, so infer.tta view(s) "
                          f"{', '.join(scaled)} cannot run on it; use none and hflip, or another backbone")


def backbone_problems(backbone: str, pretrained_file=None) -> list[str]:
    """What stops `backbone` from being built at all: checked here only, for check_backbones at load and for
    a MaskNet built from a bundle or a test."""
    problems = [] if timm.is_model(backbone) else [f"{backbone!r} is not a timm model"]
    if pretrained_file and not Path(pretrained_file).is_file():
        problems.append(f"the file for {backbone} was not found: {pretrained_file}")
    return problems


def check_backbones(cfg: dict) -> None:
    """Every configured backbone is a timm model, its pretrained file (if any) exists, and it takes the
    configured input size; all problems named at once."""
    problems = []
    for backbone in cfg["model"]["backbones"]:
        if found := backbone_problems(backbone, cfg["model"]["pretrained_files"].get(backbone)):
            problems += found
            continue
        try:
            check_input_size(cfg, backbone)
            check_tta(cfg, backbone)
            if cfg["model"]["pretrained"] and backbone not in cfg["model"]["pretrained_files"]:
                cached_weights(backbone)  # offline: fails in seconds, before any data is decoded
        except ConfigError as error:
            problems.append(str(error).removeprefix("model.backbones: "))
    if problems:
        raise ConfigError("model.backbones / model.pretrained_files: " + "; ".join(problems))
