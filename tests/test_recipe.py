"""The transfer-learning recipe: per-step LR schedules, freeze then fine-tune, EMA of the weights,
pretrained weights from a file, and Weights & Biases logging."""
import copy
import json
import socket
import struct
import sys
import threading

import numpy as np
import pytest
import timm
import torch

from pipeline.config import load_config
from pipeline.data.dataset import load_train_data
from pipeline.errors import ConfigError
from pipeline.io import load_npz, torch_load
from pipeline.stages import folds
from pipeline.train import loop
from pipeline.train.model import MaskNet
from pipeline.train.predict import eval_normalize, predict
from pipeline.train.schedule import Schedule, make_optimizer
from tests.conftest import make_config
from tests.test_train import FAST, job_folder, killed_and_resumed, run_job

BACKBONE = "mobilenetv3_small_050"


# ---- the learning rate at every optimizer step ----

def _schedule(*overrides, steps_per_epoch=10, model=None):
    cfg = load_config("configs/demo.yaml", ["train.lr=1.0", "train.min_lr=0", "train.epochs=5",
                                            "train.backbone_lr_mult=1.0", *overrides])
    model = model or MaskNet(BACKBONE)
    optimizer = make_optimizer(cfg, model)
    return Schedule(cfg, optimizer, steps_per_epoch), optimizer


def _rates(schedule, optimizer, steps):
    """{step: [lr of each param group]} after Schedule.set(step), as the loop calls it before each step."""
    rates = {}
    for step in steps:
        schedule.set(step)
        rates[step] = [group["lr"] for group in optimizer.param_groups]
    return rates


def test_warmup_and_cosine_are_set_per_step_down_to_the_minimum_lr():
    schedule, optimizer = _schedule("train.warmup_epochs=1", "train.min_lr=0.1")
    head = {step: lrs[-1] for step, lrs in _rates(schedule, optimizer, [0, 4, 9, 10, 30, 49]).items()}
    # warmup: 10 steps from 1/10 of the rate up to it; then cosine over the 40 steps left, to min_lr
    assert head[0] == pytest.approx(0.1) and head[4] == pytest.approx(0.5) and head[9] == pytest.approx(1.0)
    assert head[10] == pytest.approx(1.0)
    assert head[30] == pytest.approx(0.1 + 0.9 * 0.5)
    assert head[49] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 39 / 40)))
    schedule.set(10_000)
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(0.1)


def test_step_schedule_cuts_every_step_size_epochs_and_never_below_the_minimum():
    schedule, optimizer = _schedule("train.schedule=step", "train.warmup_epochs=0", "train.step_size=2",
                                    "train.gamma=0.5", "train.min_lr=0.3")
    head = {step: lrs[-1] for step, lrs in _rates(schedule, optimizer, [0, 19, 20, 39, 40]).items()}
    assert head == pytest.approx({0: 1.0, 19: 1.0, 20: 0.5, 39: 0.5, 40: 0.3})


def test_plateau_warms_up_per_step_then_cuts_after_its_patience():
    schedule, optimizer = _schedule("train.schedule=plateau", "train.warmup_epochs=0.5", "train.gamma=0.5",
                                    "train.plateau_patience=1")
    assert [lrs[-1] for lrs in _rates(schedule, optimizer, [0, 2, 4, 5]).values()] == pytest.approx([0.2, 0.6, 1, 1])
    for f1 in (0.3, 0.4, 0.4):  # a better F1, then one epoch without: within patience
        schedule.observe(f1)
    assert _rates(schedule, optimizer, [30])[30][-1] == pytest.approx(1.0)
    schedule.observe(0.4)  # the second epoch without a better F1 halves the rate
    assert _rates(schedule, optimizer, [40])[40][-1] == pytest.approx(0.5)


def test_the_backbone_rests_while_frozen_then_warms_up_again_at_its_multiple():
    schedule, optimizer = _schedule("train.freeze_epochs=2", "train.warmup_epochs=1", "train.backbone_lr_mult=0.1",
                                    "train.schedule=none")
    rates = _rates(schedule, optimizer, [0, 9, 19, 20, 24, 29, 40])
    backbone = {step: lrs[0] for step, lrs in rates.items()}
    head = {step: lrs[-1] for step, lrs in rates.items()}
    assert head == pytest.approx({0: 0.1, 9: 1, 19: 1, 20: 1, 24: 1, 29: 1, 40: 1})
    assert backbone == pytest.approx({0: 0, 9: 0, 19: 0, 20: 0.01, 24: 0.05, 29: 0.1, 40: 0.1})
    assert all(group["backbone"] for group in optimizer.param_groups[:-1])
    assert not optimizer.param_groups[-1]["backbone"]


def test_layer_decay_gives_each_lower_layer_a_smaller_rate():
    schedule, optimizer = _schedule("train.layer_decay=0.5", "train.backbone_lr_mult=0.2", "train.warmup_epochs=0",
                                    "train.schedule=none", model=MaskNet("resnet10t"))
    schedule.set(0)
    backbone = sorted({round(group["lr"], 8) for group in optimizer.param_groups[:-1]})
    assert len(backbone) >= 4
    assert backbone[-1] == pytest.approx(0.2)  # the top layer: lr x backbone_lr_mult
    assert backbone[-2] == pytest.approx(0.1) and backbone[0] == pytest.approx(0.2 * 0.5 ** (len(backbone) - 1))
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(1.0)
    counted = sum(len(group["params"]) for group in optimizer.param_groups)
    assert counted == len(list(MaskNet("resnet10t").parameters()))


def test_a_resumed_schedule_sets_the_same_rates_as_an_uninterrupted_one():
    whole, optimizer = _schedule("train.schedule=plateau", "train.warmup_epochs=1", "train.gamma=0.5",
                                 "train.freeze_epochs=1")
    f1s = [0.2, 0.2, 0.2, 0.3, 0.3]
    expected = []
    for epoch, f1 in enumerate(f1s):
        expected.append(_rates(whole, optimizer, range(epoch * 10, epoch * 10 + 10)))
        whole.observe(f1)
    # stop after epoch 2 (its state saved as last.pt saves it), resume in a new process's objects
    first, optimizer = _schedule("train.schedule=plateau", "train.warmup_epochs=1", "train.gamma=0.5",
                                 "train.freeze_epochs=1")
    for f1 in f1s[:3]:
        first.observe(f1)
    saved = copy.deepcopy(first.state_dict())
    resumed, optimizer = _schedule("train.schedule=plateau", "train.warmup_epochs=1", "train.gamma=0.5",
                                   "train.freeze_epochs=1")
    resumed.load_state_dict(saved)
    for epoch in (3, 4):
        assert _rates(resumed, optimizer, range(epoch * 10, epoch * 10 + 10)) == expected[epoch]
        resumed.observe(f1s[epoch])
    assert expected[3][30][-1] == pytest.approx(0.5)  # the cut happened before the stop


# ---- freeze, then fine-tune ----

def _weights_file(tmp_path, backbone):
    """A timm model's weights saved as the hub would serve them (with its classifier)."""
    source = timm.create_model(backbone, pretrained=False)
    path = tmp_path / f"{backbone}.pth"
    torch.save(source.state_dict(), path)
    return path, source.state_dict()


def _job(tmp_path, tiny_data, *overrides):
    cfg = make_config(tmp_path, tiny_data, *FAST, *overrides)
    folds.run(cfg)
    return cfg, loop.build_job(cfg, BACKBONE, 0, load_train_data(cfg))


def _state(module):
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def test_a_frozen_backbone_keeps_its_weights_and_batchnorm_statistics_then_trains(tmp_path, tiny_data):
    weights, _ = _weights_file(tmp_path, BACKBONE)
    cfg, job = _job(tmp_path, tiny_data, "train.freeze_epochs=1", f"model.pretrained_files={{{BACKBONE}: {weights}}}")
    before, head_before = _state(job.model.backbone), _state(job.model.head)
    assert any("running_mean" in name for name in before)
    loop.train_one_epoch(cfg, job, 0)
    after = _state(job.model.backbone)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert not torch.equal(_state(job.model.head)["1.weight"], head_before["1.weight"])
    # frozen means no backward through the backbone at all, not only a zero learning rate
    assert all(p.grad is None for p in job.model.backbone.parameters())

    loop.train_one_epoch(cfg, job, 1)  # unfrozen: weights and statistics move
    moved = _state(job.model.backbone)
    changed = [name for name, tensor in before.items() if not torch.equal(moved[name], tensor)]
    assert any("running_mean" in name for name in changed) and any(name.endswith("weight") for name in changed)


@pytest.mark.parametrize("recipe", [
    ["train.freeze_epochs=2", "train.ema_decay=0.9", "train.schedule=plateau"],   # killed while still frozen
    ["train.freeze_epochs=1", "train.ema_decay=0.9", "train.layer_decay=0.7"],    # killed just after the switch
], ids=["killed-frozen", "killed-after-unfreeze"])
def test_a_killed_recipe_job_resumes_to_the_same_result(tmp_path, tiny_data, recipe):
    history = killed_and_resumed(tmp_path, tiny_data, *recipe)["history"]
    frozen = int(recipe[0].split("=")[1])
    assert [r["frozen"] for r in history] == [1] * frozen + [0] * (len(history) - frozen)


# ---- EMA ----

def test_validation_best_pt_and_inference_use_the_ema_weights(tmp_path, tiny_data):
    summary = run_job(tmp_path, tiny_data, "train.ema_decay=0.9", "train.epochs=1")
    assert summary["best_epoch"] == 0
    best, last = torch_load(job_folder(tmp_path) / "best.pt"), torch_load(job_folder(tmp_path) / "last.pt")
    ema = {name.removeprefix("module."): tensor for name, tensor in last["ema"].items()}
    assert ema.keys() == best["model"].keys()
    for name, tensor in best["model"].items():
        assert torch.equal(tensor, ema[name]), name
    assert not all(torch.equal(tensor, last["model"][name]) for name, tensor in best["model"].items())

    # the validation table of the best epoch is what the EMA weights predict
    cfg = make_config(tmp_path, tiny_data, *FAST, "train.ema_decay=0.9", "train.epochs=1")
    data = load_train_data(cfg)
    model = MaskNet(BACKBONE)
    model.load_state_dict(best["model"])
    _, val_rows = data.split(0)
    probs = predict(model, data.store(torch.device("cpu")), val_rows, eval_normalize(cfg, torch.device("cpu")),
                    cfg["infer"]["batch_size"])
    np.testing.assert_allclose(probs["joint"], load_npz(job_folder(tmp_path) / "val_probs.npz")["probs_joint"],
                               atol=1e-6)


# ---- pretrained weights from a file ----

@pytest.mark.parametrize("backbone", ["resnet10t", "test_vit"])
def test_weights_from_a_file_are_the_weights_of_the_file(tmp_path, monkeypatch, backbone):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, saved = _weights_file(tmp_path, backbone)
    cfg = load_config("configs/demo.yaml", [f"model.backbones=[{backbone}]", f"model.pretrained_files={{{backbone}: {path}}}",
                                            "data.image_size=[160,160]" if backbone == "test_vit" else "model.drop_rate=0"])
    from pipeline.train.model import build_model

    loaded = build_model(cfg, backbone).backbone.state_dict()
    classifier = {name for name in saved if name not in loaded}
    assert classifier and all(name.startswith(("fc.", "head.")) for name in classifier)  # only the classifier dropped
    for name, tensor in loaded.items():
        assert torch.equal(tensor, saved[name]), name
    random = MaskNet(backbone).backbone.state_dict()
    assert not all(torch.equal(tensor, random[name]) for name, tensor in loaded.items() if tensor.is_floating_point())


def test_weights_of_another_backbone_are_refused_naming_the_file(tmp_path):
    path, _ = _weights_file(tmp_path, "resnet10t")
    with pytest.raises(ConfigError, match=rf"model.pretrained_files: {path} holds no usable test_vit weights"):
        MaskNet("test_vit", pretrained_file=path)


# ---- Weights & Biases ----

def _wandb_records(path):
    """The records of a .wandb file. wandb 0.31's reader lives in its Go core, so the file's framing (LevelDB
    log blocks of 32 KiB, 7-byte record headers, after a 7-byte file header) is read here."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    position, chunks = 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # too little room left in the block for a header: padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunks += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record
        elif kind == 0:
            break


@pytest.fixture
def no_network_listener(monkeypatch):
    """W&B pointed at a local port that counts every connection: offline must make none."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    connections, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                connections.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    yield connections
    stop.set()
    thread.join()
    server.close()


def test_wandb_offline_writes_the_epoch_metrics_to_a_local_run_and_touches_no_network(
        tmp_path, tiny_data, no_network_listener):
    summary = run_job(tmp_path, tiny_data, "log.wandb=offline", "log.project=maskfold-test", "log.group=recipe",
                      "tune.storage=postgresql://user:s3cret@db.example/optuna")
    runs = list((job_folder(tmp_path) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    history, config = {}, {}
    for record in _wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history[record.history.step.num] = {item.key or ".".join(item.nested_key): json.loads(item.value_json)
                                                for item in record.history.item}
        elif kind == "run":
            assert (record.run.project, record.run.run_group) == ("maskfold-test", "recipe")
            assert record.run.display_name == f"{BACKBONE}-fold0"
            config = {item.key: item.value_json for item in record.run.config.update}
    assert sorted(history) == [r["epoch"] for r in summary["history"]]
    for r in summary["history"]:
        assert history[r["epoch"]]["val_f1"] == pytest.approx(r["val_f1"])
        assert history[r["epoch"]]["loss_age"] == pytest.approx(r["loss_age"])
    assert "s3cret" not in config["tune"] and "***" in config["tune"]
    assert not any(b"s3cret" in path.read_bytes() for path in job_folder(tmp_path).rglob("*") if path.is_file())
    assert no_network_listener == []


def test_wandb_off_never_imports_it(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of wandb now raises ImportError
    run_job(tmp_path, tiny_data, "log.wandb=off")
    assert not (job_folder(tmp_path) / "wandb").exists()
    with pytest.raises(ConfigError, match="log.wandb is 'offline' but the wandb package is not installed"):
        run_job(tmp_path / "b", tiny_data, "log.wandb=offline")


def test_a_bare_yaml_off_means_off(tmp_path, tiny_data):
    cfg = make_config(tmp_path, tiny_data, "log.wandb=off")
    assert cfg["log"]["wandb"] is False  # what YAML made of it: accepted, and read as off
    run_job(tmp_path, tiny_data, "log.wandb=off")
    assert not (job_folder(tmp_path) / "wandb").exists()
