"""Training jobs: kill -9 and resume, stale checkpoints, local pretrained weights, losses, CutMix, batches, schedules."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.data.dataset import load_train_data
from pipeline.errors import ArtifactError, ConfigError, StaleArtifactError
from pipeline.io import PROJECT_ROOT, load_npz
from pipeline.stages import folds, train
from pipeline.train.augment import eval_transform, train_transform
from pipeline.train.batches import EpochSampler, ImageDataset, same_label_cutmix
from pipeline.train.model import MaskNet
from tests.conftest import make_config

FAST = ["data.image_size=[32,40]", "folds.k=3", "model.backbones=[mobilenetv3_small_050]", "train.folds=[0]",
        "train.epochs=4", "train.patience=10", "train.batch_size=16", "augment.train=[{name: HorizontalFlip, p: 0.5}]"]


def cli(tmp, data, *overrides):
    return [sys.executable, "-m", "pipeline.stages.train", "-c", "configs/demo.yaml", f"data.root={data}",
            f"output.dir={tmp / 'run'}", f"folds.dir={tmp / 'folds'}", f"data.cache_dir={tmp / 'cache'}",
            f"data.label_fixes={data / 'label_fixes.csv'}",
            "data.num_workers=1", *FAST, *overrides]


def run_job(tmp, data):
    cfg = make_config(tmp, data, *FAST)
    folds.run(cfg)
    return train.run(cfg)[0]


def job_folder(tmp):
    return tmp / "run" / "train" / "mobilenetv3_small_050" / "fold0"


def test_a_killed_job_resumes_to_the_same_result(tmp_path, tiny_data):
    reference = run_job(tmp_path / "a", tiny_data)

    killed = tmp_path / "b"
    folds.run(make_config(killed, tiny_data, *FAST))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(cli(killed, tiny_data), cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    last = job_folder(killed) / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)  # somewhere in epoch 1, possibly mid-write
    process.wait()
    assert not (job_folder(killed) / "done.json").exists(), "job finished before it could be killed"

    resumed = train.run(make_config(killed, tiny_data, *FAST))[0]
    assert resumed["best_epoch"] == reference["best_epoch"]
    assert resumed["best_f1"] == reference["best_f1"]
    for a, b in zip(resumed["history"], reference["history"]):
        assert {k: v for k, v in a.items() if k != "images_per_s"} == {k: v for k, v in b.items() if k != "images_per_s"}
    np.testing.assert_array_equal(load_npz(job_folder(killed) / "val_probs.npz")["probs_joint"],
                                  load_npz(job_folder(tmp_path / "a") / "val_probs.npz")["probs_joint"])


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


def test_checkpoints_load_with_weights_only(tmp_path, tiny_data):
    run_job(tmp_path, tiny_data)
    for name in ("best.pt", "last.pt"):
        checkpoint = torch.load(job_folder(tmp_path) / name, weights_only=True)
        assert "model" in checkpoint


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


def test_a_missing_pretrained_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nothere.pth"):
        MaskNet("resnet10t", pretrained_file=tmp_path / "nothere.pth")


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


def test_validation_never_sees_training_augmentation():
    cfg = load_config("configs/demo.yaml")
    image = np.random.default_rng(0).integers(0, 255, (40, 32, 3), dtype=np.uint8)
    transform = eval_transform(cfg)
    assert [type(t).__name__ for t in transform.transforms] == ["Normalize", "ToTensorV2"]
    assert torch.equal(transform(image=image)["image"], transform(image=image)["image"])


def _noise_batches(workers: int, seed: int = 1000) -> list[torch.Tensor]:
    cfg = load_config("configs/demo.yaml", ["augment.train=[{name: GaussNoise, std_range: [0.2, 0.3], p: 1.0}]"])
    images = np.zeros((8, 16, 16, 3), np.uint8)  # identical inputs: any difference is the augmentation
    dataset = ImageDataset(images, train_transform(cfg))
    dataset.epoch_seed = seed
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers, sampler=EpochSampler(8, seed))
    return [batch for batch, _ in loader]


def test_augmentation_does_not_depend_on_the_number_of_workers():
    alone, two_workers = _noise_batches(0), _noise_batches(2)
    for a, b in zip(alone, two_workers):
        assert torch.equal(a, b)
    samples = torch.cat(alone)
    assert all(not torch.equal(samples[i], samples[j]) for i in range(8) for j in range(i))  # each its own draw
    assert not torch.equal(torch.cat(_noise_batches(0, seed=1001)), samples)  # another epoch, other draws


def test_image_dataset_reads_targets_of_its_rows():
    images = np.arange(6, dtype=np.uint8)[:, None, None, None].repeat(4, 1).repeat(4, 2).repeat(3, 3)
    targets = {"joint": np.array([10, 11, 12, 13, 14, 15])}
    dataset = ImageDataset(images, lambda image: {"image": image}, rows=[4, 1], targets=targets)
    assert [dataset[i][1]["joint"] for i in range(2)] == [14, 11]
    assert [int(dataset[i][0][0, 0, 0]) for i in range(2)] == [4, 1]
    with pytest.raises(ValueError, match="6 images"):
        ImageDataset(images, None, rows=[4, 1], targets={"joint": np.array([14, 11])})


def test_a_training_job_never_validates_on_a_person_it_trained_on(tmp_path, tiny_data):
    cfg = make_config(tmp_path, tiny_data, "folds.k=3")
    folds.run(cfg)
    data = load_train_data(cfg)
    people = data.table["person_id"].to_numpy()
    for fold in range(3):
        train_rows, val_rows = data.split(fold)
        assert len(val_rows) and not set(people[train_rows]) & set(people[val_rows])
        assert len(train_rows) + len(val_rows) == len(people)


def _lrs(cfg, epochs, f1s=None):
    from pipeline.train.schedule import make_optimizer, make_scheduler, step_scheduler

    optimizer = make_optimizer(cfg, torch.nn.Linear(2, 2))
    scheduler = make_scheduler(cfg, optimizer)
    lrs = []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        step_scheduler(scheduler, (f1s or [0.0] * epochs)[epoch])
    return lrs, optimizer, scheduler


def test_warmup_then_cosine_learning_rates():
    cfg = load_config("configs/demo.yaml", ["train.lr=1.0", "train.epochs=5", "train.warmup_epochs=1"])
    lrs, _, _ = _lrs(cfg, 5)
    assert lrs == pytest.approx([0.5, 1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.5 * (1 + np.cos(3 * np.pi / 4))])


def test_step_and_plateau_learning_rates():
    step = load_config("configs/demo.yaml", ["train.lr=1.0", "train.schedule=step", "train.warmup_epochs=0",
                                             "train.step_size=2", "train.gamma=0.5"])
    assert _lrs(step, 5)[0] == pytest.approx([1, 1, 0.5, 0.5, 0.25])
    plateau = load_config("configs/demo.yaml", ["train.lr=1.0", "train.schedule=plateau", "train.warmup_epochs=0",
                                                "train.gamma=0.5"])
    # patience 1: the second epoch without a better F1 halves the rate
    assert _lrs(plateau, 5, [0.3, 0.4, 0.4, 0.4, 0.5])[0] == pytest.approx([1, 1, 1, 1, 0.5])


def test_a_resumed_schedule_continues_where_it_stopped():
    from pipeline.train.schedule import make_optimizer, make_scheduler

    cfg = load_config("configs/demo.yaml", ["train.lr=1.0", "train.epochs=6", "train.warmup_epochs=2"])
    whole, _, _ = _lrs(cfg, 6)
    _, optimizer, scheduler = _lrs(cfg, 3)
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    optimizer = make_optimizer(cfg, torch.nn.Linear(2, 2))
    scheduler = make_scheduler(cfg, optimizer)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    resumed = []
    for _ in range(3):
        resumed.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert resumed == pytest.approx(whole[3:])


@pytest.mark.parametrize("variant", [
    ["model.head=single", "train.loss=f1", "train.class_weights=true"],
    ["train.schedule=plateau", "train.warmup_epochs=0", "train.optimizer=adamw", "train.lr=0.001", "train.loss=focal"],
    ["train.schedule=step", "train.cutmix_p=1.0", "train.weighted_sampler=false", "train.loss=smooth"],
])
def test_every_head_loss_schedule_and_cutmix_option_trains(tmp_path, tiny_data, variant):
    cfg = make_config(tmp_path, tiny_data, *FAST, "train.epochs=2", "train.max_batches=2", *variant)
    folds.run(cfg)
    summary = train.run(cfg)[0]
    assert summary["epochs_run"] == 2
    probs = load_npz(job_folder(tmp_path) / "val_probs.npz")
    np.testing.assert_allclose(probs["probs_joint"].sum(1), 1, rtol=1e-4)
    np.testing.assert_allclose(probs["probs_mask"].sum(1), 1, rtol=1e-4)
