"""One owner per allowed value: what the config accepts is exactly what the code implements. Each test fails if
a loss, head kind, augmentation engine, TTA view or search-space type is added in one place only."""
from __future__ import annotations

from typing import get_args

import numpy as np
import optuna
import pytest
import torch

from pipeline import labels, schema
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.study import suggest
from pipeline.train import augment, losses
from pipeline.train.model import MaskNet
from pipeline.train.predict import tta_views


def allowed(section, key) -> tuple:
    return get_args(section.model_fields[key].annotation)


def test_every_loss_the_config_allows_is_implemented_and_distinct():
    assert allowed(schema.TrainSection, "loss") == losses.LOSSES
    torch.manual_seed(0)
    logits, target = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    values = {name: float(losses.loss_fn(name, None, 0.2, 2.0)(logits, target)) for name in losses.LOSSES}
    assert len(set(np.round(list(values.values()), 6))) == len(values), values  # no name falls through to another


def test_every_head_kind_the_config_allows_builds_a_model():
    assert allowed(schema.ModelSection, "head") == labels.HEAD_KINDS
    outputs = {kind: MaskNet("resnet10t", kind).head[-1].out_features for kind in labels.HEAD_KINDS}
    assert outputs == {kind: labels.num_outputs(kind) for kind in labels.HEAD_KINDS}


def test_the_config_allows_exactly_the_augmentation_engines_there_are():
    assert allowed(schema.AugmentSection, "engine") == ("auto", *augment.ENGINES)


@pytest.mark.parametrize("view", ["none", "hflip", "scale:1.5"])
def test_every_tta_view_the_config_allows_is_a_view(view):
    cfg = load_config("configs/demo.yaml", [f"infer.tta=[{view!r}]"])
    assert len(tta_views(torch.zeros(1, 3, 8, 8), cfg["infer"]["tta"])) == 1


def test_a_view_the_config_refuses_is_no_view():
    with pytest.raises(ConfigError, match="infer.tta"):
        load_config("configs/demo.yaml", ["infer.tta=[vflip]"])
    with pytest.raises(ValueError, match="unknown view"):
        tta_views(torch.zeros(1, 3, 8, 8), ["vflip"])


def test_every_search_space_type_the_config_allows_is_drawn():
    space = {"float": {"param": "train.lr", "type": "float", "low": 0.01, "high": 0.1},
             "int": {"param": "train.epochs", "type": "int", "low": 1, "high": 3},
             "categorical": {"param": "train.loss", "type": "categorical", "choices": ["ce", "focal"]}}
    assert tuple(space) == schema.SPACE_TYPES
    trial = optuna.trial.FixedTrial({"train.lr": 0.05, "train.epochs": 2, "train.loss": "focal"})
    assert suggest(trial, list(space.values())) == {"train.lr": 0.05, "train.epochs": 2, "train.loss": "focal"}
