import pytest

from pipeline.config import ConfigError, load_config


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
