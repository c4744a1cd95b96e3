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
from pipeline.train import augment, engines, losses, views
from pipeline.train.model import MaskNet
from pipeline.train.views import tta_views


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
    assert allowed(schema.AugmentSection, "engine") == (engines.AUTO, *engines.ENGINES)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for name in engines.ENGINES:  # the engine a job runs is the one configured
        assert augment.engine({"augment": {"engine": name}}, cpu) == name
    assert [augment.engine({"augment": {"engine": "auto"}}, d) for d in (cpu, cuda)] == ["albumentations", "kornia"]
    with pytest.raises(ValueError, match="unknown engine"):
        engines.engine("torchvision", "cpu")


def test_the_schema_states_and_checks_the_views_their_owner_defines():
    assert views.ALLOWED in schema.InferSection.model_fields["tta"].description
    for name in (*views.FIXED, f"{views.SCALE}{views.SCALE_RANGE[0]}", f"{views.SCALE}{views.SCALE_RANGE[1]}"):
        load_config("configs/demo.yaml", [f"infer.tta=[{name!r}]"])
    for name in (f"{views.SCALE}{views.SCALE_RANGE[0] / 2}", f"{views.SCALE}{views.SCALE_RANGE[1] * 2}", "scale:x"):
        with pytest.raises(ConfigError, match="infer.tta"):
            load_config("configs/demo.yaml", [f"infer.tta=[{name!r}]"])


@pytest.mark.parametrize("view", [*views.FIXED, "scale:1.5"])
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
