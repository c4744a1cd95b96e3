"""Training jobs: kill -9 and resume, stale checkpoints, local pretrained weights, losses, CutMix, batches, schedules."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pipeline import labels
from pipeline.config import load_config
from pipeline.data.dataset import load_train_data
from pipeline.errors import ArtifactError, ConfigError, StaleArtifactError
from pipeline.io import PROJECT_ROOT, load_npz
from pipeline.stages import folds, train
from pipeline.train.augment import Normalize, gpu_augmenter, train_transform
from pipeline.train.batches import DeviceBatches, EpochSampler, ImageDataset, same_label_cutmix
from pipeline.train import loop
from pipeline.train.model import MaskNet
from pipeline.train.predict import eval_normalize, predict
from tests.conftest import make_config

FAST = ["data.image_size=[32,40]", "folds.k=3", "model.backbones=[mobilenetv3_small_050]", "train.folds=[0]",
        "train.epochs=4", "train.patience=10", "train.batch_size=16", "augment.train=[{name: HorizontalFlip, p: 0.5}]"]


def cli(tmp, data, *overrides):
    return [sys.executable, "-m", "pipeline.stages.train", "-c", "configs/demo.yaml", f"data.root={data}",
            f"output.dir={tmp / 'run'}", f"folds.dir={tmp / 'folds'}", f"data.cache_dir={tmp / 'cache'}",
            f"data.label_fixes={data / 'label_fixes.csv'}",
            "data.num_workers=1", *FAST, *overrides]


def run_job(tmp, data, *overrides):
    cfg = make_config(tmp, data, *FAST, *overrides)
    folds.run(cfg)
    return train.run(cfg)[0]


def job_folder(tmp):
    return tmp / "run" / "train" / "mobilenetv3_small_050" / "fold0"


TIMINGS = {"images_per_s", "data_wait"}


@pytest.mark.parametrize("engine", ["albumentations", "kornia"])
def test_a_killed_job_resumes_to_the_same_result(tmp_path, tiny_data, engine):
    killed_and_resumed(tmp_path, tiny_data, f"augment.engine={engine}")


def killed_and_resumed(tmp_path, tiny_data, *overrides):
    """A job killed with SIGKILL early in epoch 1 and resumed ends exactly where an uninterrupted one does."""
    reference = run_job(tmp_path / "a", tiny_data, *overrides)

    killed = tmp_path / "b"
    folds.run(make_config(killed, tiny_data, *FAST, *overrides))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(cli(killed, tiny_data, *overrides), cwd=PROJECT_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = job_folder(killed) / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)  # somewhere in epoch 1, possibly mid-write
    process.wait()
    assert not (job_folder(killed) / "done.json").exists(), "job finished before it could be killed"

    resumed = train.run(make_config(killed, tiny_data, *FAST, *overrides))[0]
    assert resumed["best_epoch"] == reference["best_epoch"]
    assert resumed["best_f1"] == reference["best_f1"]
    for a, b in zip(resumed["history"], reference["history"], strict=True):
        assert {k: v for k, v in a.items() if k not in TIMINGS} == {k: v for k, v in b.items() if k not in TIMINGS}
    np.testing.assert_array_equal(load_npz(job_folder(killed) / "val_probs.npz")["probs_joint"],
                                  load_npz(job_folder(tmp_path / "a") / "val_probs.npz")["probs_joint"])
    for name in ("best.pt", "last.pt"):
        a, b = torch.load(job_folder(killed) / name, weights_only=True), torch.load(job_folder(tmp_path / "a") / name,
                                                                                     weights_only=True)
        for part in ("model", "ema"):
            for key, tensor in (a.get(part) or {}).items():
                assert torch.equal(tensor, b[part][key]), (name, part, key)
    return reference


def test_a_changed_config_never_resumes_a_stale_checkpoint(tmp_path, tiny_data):
    cfg = make_config(tmp_path, tiny_data, *FAST, "train.epochs=1")
    folds.run(cfg)
    train.run(cfg)
    (job_folder(tmp_path) / "done.json").unlink()  # as if killed after its last epoch
    changed = make_config(tmp_path, tiny_data, *FAST, "train.epochs=1", "train.lr=0.0001")
    with pytest.raises(StaleArtifactError, match="last.pt was made from other inputs"):
        train.run(changed)
    summary = train.run(changed, force=True)[0]
    assert summary["epochs_run"] == 1


def test_a_finished_job_under_another_config_is_refused(tmp_path, tiny_data):
    cfg = make_config(tmp_path, tiny_data, *FAST, "train.epochs=1")
    folds.run(cfg)
    train.run(cfg)
    with pytest.raises(StaleArtifactError, match="stale, made from other inputs .*train.loss 'ce' -> 'focal'"):
        train.run(make_config(tmp_path, tiny_data, *FAST, "train.epochs=1", "train.loss=focal"))


def test_a_finished_job_that_lost_its_checkpoint_is_trained_again(tmp_path, tiny_data, capsys):
    cfg = make_config(tmp_path, tiny_data, *FAST, "train.epochs=1", "train.max_batches=1")
    folds.run(cfg)
    train.run(cfg)
    (job_folder(tmp_path) / "best.pt").unlink()
    assert train.run(cfg)[0]["epochs_run"] == 1
    assert "best.pt missing" in capsys.readouterr().out and (job_folder(tmp_path) / "best.pt").exists()


def test_two_runs_on_one_job_folder_are_refused_and_a_killed_holder_never_blocks(tmp_path, tiny_data):
    cfg = make_config(tmp_path, tiny_data, *FAST, "train.epochs=1", "train.max_batches=1")
    folds.run(cfg)
    lock = job_folder(tmp_path).parent / ".fold0.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, sys, time
handle = open({str(lock)!r}, "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
handle.write("process 4242 (python -m pipeline.stages.train lr 0.02)"); handle.flush()
print("held", flush=True); time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ArtifactError, match=r"fold0 is in use by process 4242 \(python -m pipeline.stages.train"):
        train.run(cfg)
    holder.kill()  # SIGKILL: the kernel drops its lock; the file it leaves blocks nothing
    holder.wait()
    assert lock.exists()
    assert train.run(cfg)[0]["epochs_run"] == 1


def test_tensorboard_on_a_full_disk_names_its_folder(tmp_path, tiny_data, monkeypatch):
    import errno

    from torch.utils import tensorboard

    from pipeline.errors import WriteError

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensorboard.SummaryWriter, "__init__", full_disk)
    cfg = make_config(tmp_path, tiny_data, *FAST, "train.epochs=1", "train.max_batches=1")
    folds.run(cfg)
    with pytest.raises(WriteError, match=r"cannot write TensorBoard scalars in .*fold0/tb: No space left on device"):
        train.run(cfg)


def test_checkpoints_load_with_weights_only(tmp_path, tiny_data):
    """Both checkpoints load with weights_only=True into a fresh model, strictly, and best.pt's weights are the
    ones that predicted its validation table."""
    run_job(tmp_path, tiny_data)
    cfg = make_config(tmp_path, tiny_data, *FAST)
    data, cpu = load_train_data(cfg), torch.device("cpu")
    _, val_rows = data.split(0)
    saved = load_npz(job_folder(tmp_path) / "val_probs.npz")["probs_joint"]
    for name in ("best.pt", "last.pt"):
        checkpoint = torch.load(job_folder(tmp_path) / name, weights_only=True)
        model = MaskNet("mobilenetv3_small_050")
        model.load_state_dict(checkpoint["model"], strict=True)
        probs = predict(model, data.store(cpu), val_rows, eval_normalize(cfg, cpu), 64)["joint"]
        if name == "best.pt" or checkpoint["state"]["best_epoch"] == checkpoint["state"]["epoch"] - 1:
            np.testing.assert_allclose(probs, saved, atol=1e-6, err_msg=name)


def test_pretrained_file_loads_a_timm_weights_file_without_network(tmp_path, monkeypatch):
    import timm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = timm.create_model("resnet10t", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "resnet10t.pth")
    model = MaskNet("resnet10t", pretrained_file=tmp_path / "resnet10t.pth")
    for name, tensor in model.backbone.state_dict().items():
        if name in source.state_dict():
            assert torch.equal(tensor, source.state_dict()[name]), name
    fresh = MaskNet("resnet10t")
    assert not torch.equal(fresh.backbone.conv1[0].weight, source.conv1[0].weight)


@pytest.mark.parametrize("payload", [b"\0" * 4096, b"not a checkpoint at all"])
def test_a_pretrained_file_without_weights_is_refused_naming_it(tmp_path, payload):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(payload)
    with pytest.raises(ConfigError, match=r"model.pretrained_files: .*weights.pth holds no usable resnet10t weights"):
        MaskNet("resnet10t", pretrained_file=bad)


def test_a_missing_pretrained_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nothere.pth"):
        MaskNet("resnet10t", pretrained_file=tmp_path / "nothere.pth")


def test_pretrained_without_a_hub_fails_in_seconds_naming_pretrained_files(tmp_path, tiny_data, monkeypatch):
    """No network here: the train stage must refuse at once, not after huggingface_hub's ~45 s of retries."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty local cache
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    cfg = make_config(tmp_path, tiny_data, *FAST, "model.pretrained=true")
    import socket

    waits = []

    def unreachable(address, timeout=None, *args, **kwargs):  # no network, whatever this machine has
        waits.append(timeout)
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the look is made (offline, it refuses without one)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("a download was tried"))
    with pytest.raises(ConfigError, match=r"model.pretrained_files: \{mobilenetv3_small_050: "):
        train.run(cfg)
    assert waits and all(wait is not None and wait <= 5 for wait in waits)  # one short look, not the hub's retries


def test_pretrained_weights_in_the_local_hub_cache_are_used_offline(tmp_path, monkeypatch):
    import huggingface_hub
    import timm

    from pipeline.train.model import cached_weights

    source = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    torch.save(source.state_dict(), tmp_path / "cached.pth")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: str(tmp_path / "cached.pth"))
    assert cached_weights("resnet10t") == str(tmp_path / "cached.pth")
    model = MaskNet("resnet10t", pretrained=True)
    assert torch.equal(model.backbone.conv1[0].weight, source.conv1[0].weight)


@pytest.mark.parametrize("config", ["configs/base.yaml", "configs/demo.yaml", "configs/gpu-fast.yaml"])
def test_every_shipped_backbone_builds_and_runs_at_its_configured_size(config):
    from pipeline.train.model import build_model, check_backbones

    cfg = load_config(config, ["model.pretrained=false"])
    check_backbones(cfg)
    width, height = cfg["data"]["image_size"]
    for backbone in cfg["model"]["backbones"]:
        model = build_model(cfg, backbone).eval()
        with torch.no_grad():
            assert model(torch.zeros(1, 3, height, width)).shape == (1, 8), backbone


def test_a_backbone_that_cannot_take_the_configured_size_is_refused_naming_it(monkeypatch):
    from pipeline.train import model as model_module

    monkeypatch.setattr(model_module, "size_kwargs", lambda backbone, size: {})  # as before: built for 224x224
    cfg = load_config("configs/base.yaml", ["model.pretrained=false"])
    with pytest.raises(ConfigError, match=r"swin_tiny_patch4_window7_224 cannot take data.image_size 288x384 .*"
                                          r"it accepts its native size 224x224"):
        model_module.check_backbones(cfg)


@pytest.mark.parametrize("name", ["ce", "focal", "smooth", "f1"])
def test_every_loss_prefers_the_right_answer(name):
    from pipeline.train.losses import class_weights, loss_fn

    target = torch.tensor([0, 1, 2, 1])
    right = torch.nn.functional.one_hot(target, 3).float() * 5
    wrong = torch.nn.functional.one_hot((target + 1) % 3, 3).float() * 5
    for weight in (None, class_weights(target.numpy(), 3)):
        compute = loss_fn(name, weight, 0.1, 2.0)
        assert compute(right, target) < compute(wrong, target)


def test_cutmix_pastes_a_patch_from_another_image_with_the_same_label():
    images = torch.arange(4).float().view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()
    label = torch.tensor([0, 1, 0, 2])
    for seed in range(5):
        mixed = same_label_cutmix(images, label, torch.Generator().manual_seed(seed))
        # images alone in their label are untouched
        assert set(mixed[1].unique().tolist()) == {1.0} and set(mixed[3].unique().tolist()) == {3.0}
        # the two label-0 images each carry a patch of the other, covering 25-75 % of the area
        for own, other in ((0, 2), (2, 0)):
            share = (mixed[own] == other).float().mean().item()
            assert set(mixed[own].unique().tolist()) == {float(own), float(other)}
            assert 0.2 <= share <= 0.8, share


def test_a_misspelt_augmentation_argument_is_an_error():
    cfg = load_config("configs/demo.yaml", ["augment.train=[{name: Affine, scael: 1.1}]"])
    with pytest.raises(ConfigError, match="scael"):
        train_transform(cfg)
    cfg = load_config("configs/demo.yaml", ["augment.train=[{name: HorizontalFlipp}]"])
    with pytest.raises(ConfigError, match="HorizontalFlip"):
        train_transform(cfg)


def _noise_batches(workers: int, seed: int = 1000) -> list[torch.Tensor]:
    cfg = load_config("configs/demo.yaml", ["augment.train=[{name: GaussNoise, std_range: [0.2, 0.3], p: 1.0}]"])
    images = np.zeros((8, 16, 16, 3), np.uint8)  # identical inputs: any difference is the augmentation
    dataset = ImageDataset(images, train_transform(cfg))
    sampler = EpochSampler(8)
    sampler.set_epoch(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers, sampler=sampler)
    return [batch for batch, _ in loader]


def test_augmentation_does_not_depend_on_the_number_of_workers():
    alone, two_workers = _noise_batches(0), _noise_batches(2)
    for a, b in zip(alone, two_workers, strict=True):
        assert torch.equal(a, b)
    samples = torch.cat(alone)
    assert all(not torch.equal(samples[i], samples[j]) for i in range(8) for j in range(i))  # each its own draw
    assert not torch.equal(torch.cat(_noise_batches(0, seed=1001)), samples)  # another epoch, other draws


def test_image_dataset_reads_targets_of_its_rows():
    images = np.arange(6, dtype=np.uint8)[:, None, None, None].repeat(4, 1).repeat(4, 2).repeat(3, 3)
    targets = {"joint": np.array([10, 11, 12, 13, 14, 15])}
    dataset = ImageDataset(images, train_transform(load_config("configs/demo.yaml", ["augment.train=null"])),
                           rows=[4, 1], targets=targets)
    assert [dataset[(0, draw, i)][1]["joint"] for draw, i in enumerate(range(2))] == [14, 11]
    assert [int(dataset[(0, 0, i)][0][0, 0, 0]) for i in range(2)] == [4, 1]
    assert dataset[(0, 0, 0)][0].dtype == torch.uint8  # workers ship uint8; normalisation happens on the device
    with pytest.raises(ValueError, match="6 images"):
        ImageDataset(images, None, rows=[4, 1], targets={"joint": np.array([14, 11])})


GPU_ALL_ON = ("augment.gpu=[{name: RandomHorizontalFlip, p: 1.0}, {name: RandomAffine, degrees: 10, "
              "translate: [0.05, 0.05], scale: [0.9, 1.1], p: 1.0}, {name: ColorJitter, brightness: 0.2, "
              "contrast: 0.2, saturation: 0.2, hue: 0.02, p: 1.0}, {name: RandomGaussianNoise, std: 0.04, p: 1.0}]")


def test_the_gpu_augmenter_draws_each_samples_own_parameters():
    """Run on CPU tensors: identical inputs come out different, and every affine parameter differs per sample."""
    cfg = load_config("configs/base.yaml", [GPU_ALL_ON])
    augmenter = gpu_augmenter(cfg)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 32, 24, 3), dtype=np.uint8)).repeat(8, 1, 1, 1)
    torch.manual_seed(0)
    out = Normalize(cfg, torch.device("cpu"), augmenter)(images)
    assert all(not torch.allclose(out[i], out[j]) for i in range(8) for j in range(i))
    affine = next(step for step in augmenter.children() if type(step).__name__ == "RandomAffine")
    for name in ("angle", "translations", "scale"):
        values = affine._params[name].reshape(8, -1)
        assert len({tuple(row.tolist()) for row in values}) == 8, name
    torch.manual_seed(0)
    assert torch.equal(Normalize(cfg, torch.device("cpu"), augmenter)(images), out)  # seeded: reproducible


@pytest.mark.parametrize("engine", ["albumentations", "kornia"])
def test_with_every_probability_at_zero_training_input_equals_evaluation_input(engine):
    from pipeline.train.predict import eval_normalize

    off = ["augment.train=[{name: HorizontalFlip, p: 0.0}, {name: Affine, rotate: [-10, 10], p: 0.0}, "
           "{name: GaussNoise, std_range: [0.02, 0.06], p: 0.0}]", GPU_ALL_ON.replace("p: 1.0", "p: 0.0")]
    cfg = load_config("configs/base.yaml", off)
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 24, 3), dtype=np.uint8)
    cpu = torch.device("cpu")
    expected = eval_normalize(cfg, cpu)(torch.from_numpy(images))
    if engine == "kornia":
        trained = Normalize(cfg, cpu, gpu_augmenter(cfg))(torch.from_numpy(images))
    else:
        dataset = ImageDataset(images, train_transform(cfg))
        trained = Normalize(cfg, cpu)(torch.stack([dataset[(0, i, i)][0] for i in range(6)]))
    assert torch.equal(trained, expected)
    # the device normalisation gives albumentations' own Normalize values, bit for bit
    import albumentations as A

    reference = A.Normalize(mean=cfg["augment"]["mean"], std=cfg["augment"]["std"])(image=images[0])["image"]
    np.testing.assert_array_equal(expected[0].permute(1, 2, 0).numpy(), reference)


def test_device_batches_draw_the_same_order_and_targets_as_the_loader():
    images = np.arange(10, dtype=np.uint8)[:, None, None, None].repeat(4, 1).repeat(4, 2).repeat(3, 3)
    targets = {"joint": np.arange(10) + 100}
    rows = np.array([9, 7, 5, 3, 1, 0])
    weights = torch.tensor([1.0, 2, 3, 4, 5, 6], dtype=torch.double)
    device = DeviceBatches(images, rows, targets, 4, torch.device("cpu"), weights)
    from pipeline.train.batches import LoaderBatches

    loader = LoaderBatches(ImageDataset(images, train_transform(load_config("configs/demo.yaml", ["augment.train=null"])),
                                        rows, targets), 4, 0, torch.device("cpu"), weights)
    assert len(device) == len(loader) == 1  # 6 images, batches of 4: the partial batch is dropped
    for (a, ta), (b, tb) in zip(device.epoch(7), loader.epoch(7)):
        assert torch.equal(a, b) and torch.equal(ta["joint"], tb["joint"])
        assert torch.equal(ta["joint"] - 100, a[:, 0, 0, 0].long())  # each image with its own row's target


def test_the_kornia_engine_trains_as_well_as_the_albumentations_engine(tmp_path):
    """Same augmentation (a horizontal flip) drawn by either engine; 40 people, so the scores mean something."""
    from pipeline.stages import synth

    data = tmp_path / "data"
    synth.run(make_config(tmp_path, data, "synth.people=40", "synth.eval_people=3", "synth.image_size=[96,128]"))
    scores = {}
    for engine in ("albumentations", "kornia"):
        cfg = make_config(tmp_path / engine, data, *FAST, "data.image_size=[48,64]", "model.backbones=[resnet10t]",
                          "train.optimizer=adamw", "train.lr=0.003", "train.weight_decay=0.01", "train.epochs=12",
                          "train.patience=12", f"augment.engine={engine}", "augment.gpu=[{name: RandomHorizontalFlip, p: 0.5}]")
        folds.run(cfg)
        summary = train.run(cfg)[0]
        scores[engine] = (summary["best_f1"], max(epoch["val_f1_mask"] for epoch in summary["history"]))
    (albumentations_f1, albumentations_mask), (kornia_f1, kornia_mask) = scores["albumentations"], scores["kornia"]
    assert kornia_mask > 0.45 and albumentations_mask > 0.45, scores  # mask chance level: 1/3
    assert kornia_f1 >= albumentations_f1 - 0.08 and kornia_mask >= albumentations_mask - 0.12, scores


def test_a_training_job_never_validates_on_a_person_it_trained_on(tmp_path, tiny_data):
    cfg = make_config(tmp_path, tiny_data, "folds.k=3")
    folds.run(cfg)
    data = load_train_data(cfg)
    people = data.table["person_id"].to_numpy()
    for fold in range(3):
        train_rows, val_rows = data.split(fold)
        assert len(val_rows) and not set(people[train_rows]) & set(people[val_rows])
        assert len(train_rows) + len(val_rows) == len(people)


VARIANT = [*FAST, "train.epochs=2", "train.max_batches=2"]


def variant_losses(tmp, data, *overrides) -> tuple[dict, list[dict]]:
    """Train fold 0 with the overrides; the config and each epoch's mean training losses."""
    cfg = make_config(tmp, data, *VARIANT, *overrides)
    folds.run(cfg)
    assert train.run(cfg)[0]["epochs_run"] == 2
    records = [json.loads(line) for line in (job_folder(tmp) / "metrics.jsonl").read_text().splitlines()]
    return cfg, [{k: v for k, v in r.items() if k.startswith("loss_")} for r in records]


@pytest.fixture(scope="module")
def default_losses(tmp_path_factory, tiny_data):
    return variant_losses(tmp_path_factory.mktemp("default"), tiny_data)[1]


@pytest.mark.parametrize("variant", [
    ["model.head=single", "train.loss=f1", "train.class_weights=true"],
    ["train.schedule=plateau", "train.optimizer=adamw", "train.lr=0.001", "train.loss=focal"],
    ["train.schedule=step", "train.cutmix_p=1.0", "train.weighted_sampler=false", "train.loss=smooth"],
])
def test_every_head_loss_schedule_and_cutmix_option_trains(tmp_path, tiny_data, default_losses, variant):
    """Each variant trains: the losses of its head kind are finite, they differ from the default's (the options
    reached the step), the weights moved from the job's starting ones, and its tables are probabilities."""
    cfg, losses = variant_losses(tmp_path, tiny_data, *variant)
    heads = ["loss_joint"] if "model.head=single" in variant else [f"loss_{h}" for h in labels.HEADS]
    assert all(sorted(epoch) == sorted(heads) and np.isfinite(list(epoch.values())).all() for epoch in losses)
    assert losses != default_losses
    start = loop.build_job(cfg, "mobilenetv3_small_050", 0, load_train_data(cfg)).model.state_dict()
    trained = torch.load(job_folder(tmp_path) / "last.pt", weights_only=True)["model"]
    assert any(not torch.equal(start[name], trained[name]) for name in start if start[name].is_floating_point())
    probs = load_npz(job_folder(tmp_path) / "val_probs.npz")
    for key in labels.TABLE_KEYS:
        assert (probs[f"probs_{key}"] >= 0).all()
        np.testing.assert_allclose(probs[f"probs_{key}"].sum(1), 1, rtol=1e-4)


def test_a_scale_tta_view_on_a_fixed_size_backbone_is_refused_before_training(tmp_path, tiny_data):
    cfg = make_config(tmp_path, tiny_data, *FAST, "model.backbones=[test_vit]", "data.image_size=[160,160]",
                      "infer.tta=[none,'scale:1.1']")
    with pytest.raises(ConfigError, match=r"test_vit has a fixed input size, so infer.tta view\(s\) scale:1.1"):
        train.run(cfg)
    assert not (tmp_path / "run" / "train").exists()  # refused before any job started
    from pipeline.stages import infer

    with pytest.raises(ConfigError, match="test_vit has a fixed input size"):
        infer.run(cfg)


def test_class_weights_are_moved_to_the_device_once_not_at_every_step():
    from pipeline.train.losses import loss_fn

    moves = []

    class Weights:  # stands for a host tensor; counts the copies the loss asks for
        def to(self, device):
            moves.append(device)
            return torch.ones(3)

    compute = loss_fn("ce", Weights(), 0.0, 2.0)
    for _ in range(4):
        compute(torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]))
    assert len(moves) == 1
