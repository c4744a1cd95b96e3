from pathlib import Path

import pytest
import yaml

from pipeline.config import BASE_CONFIG, ConfigError, load_config, with_values
from pipeline.schema import Config


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config("configs/demo.yaml", ["train.folds=[0,2]", "train.lr=0.01", "model.pretrained=true"])
    assert cfg["train"]["folds"] == [0, 2]
    assert cfg["train"]["lr"] == 0.01
    assert cfg["model"]["pretrained"] is True


def test_unknown_key_names_the_key_and_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.epoch'.*'train\.epochs'"):
        load_config("configs/demo.yaml", ["train.epoch=3"])


def test_unknown_key_in_a_config_file_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("folds:\n  kk: 5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'folds\.kk'.*'folds\.k'"):
        load_config(bad)


def test_wrong_value_type_is_an_error():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config("configs/demo.yaml", ["train.epochs=many"])


def test_output_dir_defaults_to_runs_and_the_config_name():
    assert load_config("configs/demo.yaml")["output"]["dir"] == "runs/demo"
    assert load_config("configs/base.yaml")["output"]["dir"] == "runs/base"


def test_keys_that_outside_checks_rely_on_exist():
    cfg = load_config("configs/demo.yaml")
    for dotted in ["data.root", "output.dir", "folds.dir", "folds.k", "folds.seed", "synth.out", "synth.people",
                   "synth.eval_people", "synth.seed", "synth.image_size", "model.backbones", "train.folds",
                   "train.epochs", "tune.trials", "tune.storage", "tune.study"]:
        node = cfg
        for part in dotted.split("."):
            assert part in node, dotted
            node = node[part]
    assert load_config("configs/base.yaml")["synth"]["image_size"] == [384, 512]


# ---- values are checked at load (pipeline/schema.py) ----

@pytest.mark.parametrize("override, key, allowed", [
    ("train.schedule=cosin", "train.schedule = 'cosin'", "one of cosine, step, plateau, none"),
    ("infer.tta=[vflip]", "infer.tta = ['vflip']", "none, hflip or scale:<factor in [0.5, 2.0]>"),
    ("infer.tta=['scale:1e9']", "infer.tta = ['scale:1e9']", "scale:<factor in [0.5, 2.0]>"),
    ("infer.tta=['scale:0.01']", "infer.tta = ['scale:0.01']", "scale:<factor in [0.5, 2.0]>"),
    ("ensemble.weights=fitt", "ensemble.weights = 'fitt'", "one of equal, fit"),
    ("model.head=multi", "model.head = 'multi'", "one of multihead, single"),
    ('data.image_size=[288,"x"]', "data.image_size = [288, 'x']", "2 integers [w, h], each >= 16"),
    ("train.epochs=null", "train.epochs = None", "an integer >= 1"),
    ("train.epochs=2.5", "train.epochs = 2.5", "an integer >= 1"),
    ("train.epochs=-1", "train.epochs = -1", "an integer >= 1"),
    ("output.dir=null", "output.dir = None", "a non-empty path"),
    ("data.image_size=[48]", "data.image_size = [48]", "2 integers [w, h], each >= 16"),
    ("data.crop.box=[0.9,0.05,0.1,0.85]", "data.crop.box = [0.9, 0.05, 0.1, 0.85]", "x0 < x1 and y0 < y1"),
    ("data.crop=[0.1,0.05,0.9,0.85]", "data.crop = [0.1, 0.05, 0.9, 0.85]", "the fixed box is data.crop.box"),
    ("data.crop.mode=face", "data.crop.mode = 'face'", "one of box, detect"),
    ("train.folds=zero", "train.folds = 'zero'", "null (all folds) or a non-empty list of distinct fold numbers"),
    ("train.folds=[7]", "train.folds = [7]", "folds in 0..4 (folds.k = 5)"),
    ("train.ema_decay=1", "train.ema_decay = 1", "0 (off) or a number in (0, 1)"),
    ("log.wandb=true", "log.wandb = True", "one of off, offline, online"),
])
def test_a_bad_value_is_refused_at_load_naming_key_value_and_what_is_allowed(override, key, allowed):
    with pytest.raises(ConfigError) as caught:
        load_config("configs/demo.yaml", [override])
    message = str(caught.value)
    assert f"\n  {key}: " in message
    assert allowed in message


@pytest.mark.parametrize("override, line", [
    ("data.old_age=30", "data.old_age = 30: must be an integer in 31..120"),
    ("synth.image_size=[16,16]", "synth.image_size = [16, 16]: must be 2 integers [w, h], each >= 32"),
    ("model.backbones=[a, a]", "model.backbones = ['a', 'a']: must be a non-empty list of distinct"),
    ("model.head_weights={mask: 1, eyes: 2}", "model.head_weights = {'mask': 1, 'eyes': 2}: must be a mapping of mask"),
    ("train.momentum=1", "train.momentum = 1: must be a number in [0, 1)"),
    ("infer.tta=[none, none]", "infer.tta = ['none', 'none']: must be a non-empty list of distinct views"),
    ("infer.tta=['scale:0']", "infer.tta = ['scale:0']: must be"),
    ("ensemble.weight_step=0.3", "ensemble.weight_step = 0.3: must be a number in (0, 1] whose inverse is whole"),
    ("tune.storage=optuna.db", "tune.storage = 'optuna.db': must be a storage URL: sqlite:///FILE"),
    ("tune.grace_s=60", "tune.grace_s = 60: must be greater than tune.heartbeat_s (60)"),
    ("tune.folds=[0, 5]", "tune.folds = [0, 5]: must list folds in 0..4"),
    ("augment.train=[{p: 1}]", "augment.train[0] = {'p': 1}: must be null or a list of albumentations transforms"),
    ("augment.std=[0.2, 0.2, 0]", "augment.std = [0.2, 0.2, 0]: must be 3 numbers > 0"),
    ("train.precision=fp8", "train.precision = 'fp8': must be one of auto, bf16, fp16, fp32"),
    ("train.clip_grad=-1", "train.clip_grad = -1: must be 0 (off) or the largest gradient norm"),
])
def test_other_rules_refuse_a_bad_value_naming_the_key(override, line):
    with pytest.raises(ConfigError) as caught:
        load_config("configs/demo.yaml", [override])
    assert f"\n  {line}" in str(caught.value)


@pytest.mark.parametrize("override", [
    "train.lr=1", "train.folds=[0,4]", "infer.tta=[none, hflip, 'scale:1.1']", "data.label_fixes=null",
    "tune.storage=postgresql://user:pw@host/db", "tune.backbone=regnetx_002", "model.head_weights={age: 2}",
    "train.schedule=plateau", "ensemble.weight_step=0.25", "augment.train=null", "train.warmup_epochs=0.5",
    "log.wandb=off", "log.wandb=offline", "train.layer_decay=0.8", "train.ema_decay=0.9998",
    "train.precision=fp16", "train.precision=bf16", "train.clip_grad=1.0",
])
def test_good_values_still_load(override):
    key, text = override.split("=", 1)
    section, name = key.split(".")
    assert load_config("configs/demo.yaml", [override])[section][name] == yaml.safe_load(text)  # loaded as given


@pytest.mark.parametrize("how", ["override", "file"])
def test_an_old_config_with_train_amp_is_told_what_to_write_instead(tmp_path, how):
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  amp: true\n")
    with pytest.raises(ConfigError, match=r"train\.amp was replaced by train\.precision.*amp: true write precision: "
                                          r"auto.*amp: false write precision: fp32"):
        load_config(old) if how == "file" else load_config("configs/demo.yaml", ["train.amp=false"])


SHIPPED_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda path: path.name)
def test_every_shipped_config_loads(path):
    assert load_config(path)["name"] == path.stem


@pytest.mark.parametrize("override", ["train.epochs=2.0", "train.epochs='3'", "train.cudnn_benchmark=1", "model.pretrained=0"])
def test_types_are_strict_no_silent_conversion(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.") + " = "):
        load_config("configs/demo.yaml", [override])


def test_one_error_lists_every_bad_key_under_a_line_naming_the_source():
    with pytest.raises(ConfigError) as caught:
        load_config("configs/demo.yaml", ["train.epochs=0", "model.head=x", "infer.tta=[]", "train.lr=fast"])
    first, *lines = str(caught.value).splitlines()
    assert "configs/demo.yaml" in first and "train.epochs=0" in first and "4 invalid" in first
    assert sorted(line.split(" = ")[0].strip() for line in lines) == [
        "infer.tta", "model.head", "train.epochs", "train.lr"]


def test_training_age_cut_may_not_move_above_the_official_one():
    with pytest.raises(ConfigError, match=r"data\.train_old_age = 61: must be <= data\.old_age \(60\)"):
        load_config("configs/demo.yaml", ["data.train_old_age=61"])


def test_tune_space_param_must_be_a_config_key():
    with pytest.raises(ConfigError, match=r"tune\.space\[0\] = .*'train\.lrr' is not a config key.*'train\.lr'"):
        load_config("configs/demo.yaml", ["tune.space=[{param: train.lrr, type: float, low: 0.01, high: 0.1}]"])


def test_tune_space_values_a_trial_could_draw_are_checked_at_load():
    with pytest.raises(ConfigError, match=r"tune\.space\[0\] = .*train\.loss = 'focall': must be one of"):
        load_config("configs/demo.yaml", ["tune.space=[{param: train.loss, type: categorical, choices: [ce, focall]}]"])
    with pytest.raises(ConfigError, match=r"tune\.space\[0\] = .*needs low < high"):
        load_config("configs/demo.yaml", ["tune.space=[{param: train.lr, type: float, low: 0.1, high: 0.01}]"])


def test_with_values_checks_values_like_load_config():
    cfg = load_config("configs/demo.yaml")
    assert with_values(cfg, {"train.lr": 0.05})["train"]["lr"] == 0.05
    with pytest.raises(ConfigError, match=r"^tune\.space \(train\.lr=-1\).*\n  train\.lr = -1: must be a number > 0"):
        with_values(cfg, {"train.lr": -1}, "tune.space")


def test_schema_declares_exactly_the_keys_of_base_yaml_and_says_what_each_allows():
    with open(BASE_CONFIG) as handle:
        base = yaml.safe_load(handle)
    assert list(Config.model_fields) == list(base)
    for section, field in Config.model_fields.items():
        assert list(field.annotation.model_fields) == list(base[section]), section
        for key, info in field.annotation.model_fields.items():
            assert info.description, f"{section}.{key} has no 'allowed' text for its errors"


# ---- placeholders: relative data paths follow the data ----

def test_label_fixes_follow_data_root(tmp_path):
    cfg = load_config("configs/demo.yaml", [f"data.root={tmp_path}"])
    assert cfg["data"]["label_fixes"] == f"{tmp_path}/label_fixes.csv"
    assert cfg["output"]["dir"] == "runs/demo"
    # on the command line a leading placeholder is a path, not a YAML mapping
    cfg = load_config("configs/demo.yaml", [f"data.root={tmp_path}", "data.cache_dir={data.root}/cache/{config}"])
    assert cfg["data"]["cache_dir"] == f"{tmp_path}/cache/demo"


def test_a_placeholder_naming_no_key_is_an_error():
    with pytest.raises(ConfigError, match=r"data\.label_fixes = '\{data\.rot\}/x\.csv': .*did you mean \{data\.root\}"):
        load_config("configs/demo.yaml", ["data.label_fixes={data.rot}/x.csv"])


def test_a_yaml_alias_bomb_is_refused_before_it_expands_naming_the_file_and_line(tmp_path):
    """Issue 20: 9**6 values from 6 lines inside an augment.train argument passed load; train then spent 101 s
    and 7 GB on them. No alias is expanded now, in a file or an override."""
    levels = ["&a0 [1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    levels += [f"&a{n} [" + ", ".join([f"*a{n - 1}"] * 9) + "]" for n in range(1, 6)]  # 9**6 values in all
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("augment:\n  train:\n    - name: Blur\n      blur_limit:\n"
                    + "".join(f"        - {level}\n" for level in levels))
    with pytest.raises(ConfigError, match=rf"{bomb} line 6: YAML alias \*a0 refused") as error:
        load_config(str(bomb))
    assert len(str(error.value)) < 300
    with pytest.raises(ConfigError, match=r"override 'train.folds=.*': YAML alias \*a refused"):
        load_config("configs/demo.yaml", ["train.folds=[&a [0], *a]"])


def test_a_config_file_over_a_mebibyte_is_refused_unread(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("train:\n  epochs: 3\n" + "#" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match=rf"config file {big}: more than 1048576 bytes"):
        load_config(big)
