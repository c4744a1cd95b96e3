"""The GPU path, checked where a CPU can show it, and the GPU check itself (bench/gpu.sh): what the GPU machine
must be carried to import pipeline, channels_last after the kornia augmentation, evaluation rows on the device,
a data wait that measures waiting, last.pt every train.checkpoint_every epochs, the CUDA settings infer shares
with train, a diverged job stopped, and the smoke step on CPU."""
import importlib.metadata
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.gpu_imports import IMAGE_PACKAGES, carried_wheels, listed
from pipeline.config import load_config
from pipeline.data.dataset import load_train_data
from pipeline.errors import ConfigError
from pipeline.io import PROJECT_ROOT
from pipeline.stages import folds
from pipeline.train import backends, checkpoint, loop
from pipeline.train.augment import Normalize, gpu_augmenter, train_transform
from pipeline.train import predict as predict_module
from pipeline.train.batches import eval_batches
from pipeline.train.predict import eval_normalize, predict
from tests.conftest import make_config
from tests.test_train import FAST

CPU = torch.device("cpu")


def _imports(*args: str) -> dict:
    done = subprocess.run([sys.executable, "bench/gpu_imports.py", "--json", *args], cwd=PROJECT_ROOT, text=True,
                          capture_output=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- what the GPU machine lacks: derived, carried as wheels ----

def test_every_module_of_pipeline_imports_on_the_gpu_image_with_the_carried_wheels_and_no_more():
    result = _imports()
    assert result["failed"] == {}, "\n".join(f"{what}: {why}" for what, why in result["failed"].items())
    assert result["unused_wheels"] == [] and result["unused_exclusions"] == [], result
    assert "pipeline.gate.server" in result["skipped"]  # fastapi stays behind: the door's server is no GPU check


def test_the_packages_left_behind_on_purpose_are_skipped_where_they_are_not_installed_at_all():
    # as on the GPU image itself (found there 2026-12-04): the -NAME packages have no metadata to map them by
    absent = ["fastapi", "uvicorn", "ray", "wandb", "facenet-pytorch", "optuna-dashboard", "tflite2onnx"]
    result = _imports("--absent", *absent, "--modules", "pipeline.gate.server", "pipeline.runner",
                      "pipeline.train.tracking", "pipeline.data.mtcnn", "pipeline.stages.dashboard",
                      "pipeline.data.blazeface")
    assert result["failed"] == {}, result["failed"]
    assert set(result["skipped"].values()) == set(absent) and result["unused_exclusions"] == []


@pytest.mark.parametrize("left_out, what, missing, importer", [
    ("annotated-types", "pipeline.schema", "annotated_types", "pydantic"),  # a carried package's own import
    ("kornia_rs", "pipeline.train.augment (inside a function: import kornia.augmentation)", "kornia_rs", "kornia"),
])
def test_the_import_check_names_the_module_and_the_package_a_carried_package_lacks(left_out, what, missing, importer):
    module = what.split()[0]
    result = _imports("--without", left_out, "--modules", module)
    assert what in result["failed"], result
    assert f"needs '{missing}' (imported by {importer}" in result["failed"][what]


def test_the_carried_wheels_are_the_versions_tested_here_and_none_is_already_in_the_image():
    image = set(listed(IMAGE_PACKAGES))
    assert {"torch", "timm", "opencv-python-headless", "pandas", "scikit-learn"} <= image
    for name, entry in carried_wheels().items():
        assert entry == f"{entry.split('==')[0]}=={importlib.metadata.version(name)}", entry
        assert name not in image, f"{name} is in the image already: carry a wheel only for a package it lacks"


# ---- the GPU path's defects, on CPU ----

def test_the_kornia_augmentation_keeps_the_batch_channels_last():
    cfg = load_config("configs/base.yaml", [])
    images = torch.randint(0, 256, (4, 32, 24, 3), dtype=torch.uint8)
    for augmenter in (None, gpu_augmenter(cfg)):
        out = Normalize(cfg, CPU, augmenter, channels_last=True)(images)
        assert out.shape == (4, 3, 32, 24) and out.stride() == (2304, 1, 72, 3), augmenter
        assert Normalize(cfg, CPU, augmenter)(images).is_contiguous()  # NCHW where the model is not channels_last


class _Transfers(TorchDispatchMode):
    """Counts the operations that take a host tensor and give a tensor on another device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        self.count += any(i.device.type == "cpu" for i in inputs) and any(o.device.type != "cpu" for o in outputs)
        return out


def test_evaluation_batches_copy_no_rows_to_the_device_per_batch():
    """A cache resident on a device (here the meta device, which has no host memory) is cut by rows already there."""
    store = torch.empty((48, 4, 4, 3), dtype=torch.uint8, device="meta")
    counts = []
    for rows in (8, 48):
        with _Transfers() as transfers:
            batches = list(eval_batches(store, np.arange(rows), torch.device("meta"), 4))
        assert len(batches) == rows // 4 and batches[0][1].device.type == "meta"
        counts.append(transfers.count)
    assert counts == [1, 1]  # the row indices, once


def test_padded_evaluation_batches_have_one_shape_and_the_tables_stay_the_same(tmp_path, tiny_data, monkeypatch):
    """On CUDA the last batch is padded (cuDNN's autotuner then tunes one shape, not one per tail batch: seconds each
    on the H200); the padding's outputs are dropped, so the tables are the unpadded ones."""
    store = torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1).expand(10, 2, 2, 3).contiguous()
    padded = list(eval_batches(store, np.arange(10), CPU, 4, pad=True))
    assert [start for start, _ in padded] == [0, 4, 8] and all(len(images) == 4 for _, images in padded)
    assert padded[-1][1][:, 0, 0, 0].tolist() == [8, 9, 9, 9]
    cfg, job = _job(tmp_path, tiny_data)
    rows = job.val_rows[:7]
    plain = predict(job.model, job.store, rows, eval_normalize(cfg, CPU), 4, ("none", "hflip"))
    monkeypatch.setattr(predict_module, "pads_batches", lambda device: True)
    shapes = []
    hook = job.model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    with_padding = predict(job.model, job.store, rows, eval_normalize(cfg, CPU), 4, ("none", "hflip"))
    hook.remove()
    assert len(set(shapes)) == 1 and shapes[0][0] == 8  # two views of 4 images, the tail batch too
    for key, table in plain.items():
        assert table.shape == with_padding[key].shape == (7, table.shape[1])
        np.testing.assert_allclose(with_padding[key], table, atol=1e-6)


def _job(tmp_path, tiny_data, *overrides):
    cfg = make_config(tmp_path, tiny_data, *FAST, *overrides)
    folds.run(cfg)
    return cfg, loop.build_job(cfg, "mobilenetv3_small_050", 0, load_train_data(cfg))


class _Slow(torch.nn.Module):
    """An augmentation that takes 200 ms a batch, as a heavy one would on the device."""

    def forward(self, x):
        time.sleep(0.2)
        return x


def test_data_wait_counts_the_time_the_kornia_engine_spends_on_the_input(tmp_path, tiny_data):
    cfg, job = _job(tmp_path, tiny_data, "augment.engine=kornia", "train.max_batches=3")
    job.prepare.augmenter = _Slow()
    record = loop.train_one_epoch(cfg, job, 0)
    seconds = 3 * 16 / record["images_per_s"]
    assert 0.6 <= record["data_wait"] * seconds < seconds  # each batch's 200 ms count as input, the steps do not


def test_on_cuda_data_wait_is_read_from_events_on_the_stream_once(monkeypatch):
    """The stream's timeline, not the host's: 3 ms of input and 1 ms of step per step, whatever the host's clock did."""
    synced = []

    class Event:  # a CUDA event: its time is the stream's, here set by the test
        clock = 0.0

        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = Event.clock

        def synchronize(self):
            synced.append(self.at)

        def elapsed_time(self, end):  # milliseconds, as CUDA's
            return end.at - self.at

    monkeypatch.setattr(torch.cuda, "Event", Event)
    clock = loop.InputClock(torch.device("cuda"))
    for _ in range(4):
        Event.clock += 3.0
        clock.mark()
        Event.clock += 1.0
        clock.mark()
    assert clock.input_share() == pytest.approx(0.75) and synced == [16.0]


def test_last_pt_is_written_every_checkpoint_every_epochs_and_after_the_last(tmp_path, tiny_data, monkeypatch):
    written = []
    save_last = checkpoint.save_last
    monkeypatch.setattr(checkpoint, "save_last", lambda artifact, job, state: (written.append(state["epoch"]),
                                                                               save_last(artifact, job, state)))
    cfg = make_config(tmp_path, tiny_data, *FAST, "train.epochs=7", "train.checkpoint_every=3", "train.max_batches=1")
    folds.run(cfg)
    loop.train_job(cfg, "mobilenetv3_small_050", 0)
    assert written == [3, 6, 7]
    assert load_config("configs/base.yaml")["train"]["checkpoint_every"] == 2  # the default bench/README.md measured


def test_train_and_infer_set_up_the_device_alike(tmp_path, tiny_data, monkeypatch):
    from pipeline.stages import infer, train

    asked = []
    job_device = backends.job_device
    monkeypatch.setattr(backends, "job_device", lambda cfg: (asked.append(cfg["name"]), job_device(cfg))[1])
    cfg = make_config(tmp_path, tiny_data, *FAST, "train.epochs=1", "train.max_batches=1")
    folds.run(cfg)
    train.run(cfg)
    assert asked == ["demo"]
    infer.run(cfg)
    assert asked == ["demo", "demo"]


def test_on_cuda_the_device_gets_cudnn_benchmark_and_tf32_from_the_config():
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    try:
        backends.cuda_settings(load_config("configs/base.yaml"))  # the defaults: both on
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
        backends.cuda_settings(load_config("configs/base.yaml", ["train.tf32=false", "train.cudnn_benchmark=false"]))
        assert not torch.backends.cudnn.benchmark and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def test_a_diverged_loss_stops_the_job_naming_the_epoch_and_the_head(tmp_path, tiny_data):
    cfg, job = _job(tmp_path, tiny_data, "train.max_batches=1")
    key, criterion = job.criteria["gender"]
    job.criteria["gender"] = (key, lambda logits, target: criterion(logits, target) * float("nan"))
    with pytest.raises(FloatingPointError, match=r"mobilenetv3_small_050 fold 0 epoch 2: mean training loss not "
                                                 r"finite \(loss_gender nan\)"):
        loop.train_one_epoch(cfg, job, 2)


def test_a_validation_table_that_is_not_finite_stops_the_job_before_any_checkpoint(tmp_path, tiny_data, monkeypatch):
    cfg = make_config(tmp_path, tiny_data, *FAST, "train.max_batches=1")
    folds.run(cfg)
    monkeypatch.setattr(loop, "validate", lambda cfg, job: ({"joint": np.full((4, 18), np.nan)}, {"f1": 0.5}))
    with pytest.raises(FloatingPointError, match=r"epoch 0: validation probabilities not finite \(joint nan\)"):
        loop.train_job(cfg, "mobilenetv3_small_050", 0)
    assert not list((tmp_path / "run").rglob("*.pt"))


def test_a_training_batch_that_is_not_channels_last_where_the_model_is_stops_the_job(tmp_path, tiny_data):
    cfg, job = _job(tmp_path, tiny_data, "train.max_batches=1")
    normalize = job.prepare
    job.prepare = lambda images: normalize(images).contiguous()  # NCHW memory, as kornia returned it
    job.prepare.channels_last = True
    with pytest.raises(RuntimeError, match="epoch 0: the training batch is not channels_last after augmentation"):
        loop.train_one_epoch(cfg, job, 0)


@pytest.mark.parametrize("engine", ["train", "gpu"])
def test_an_augmentation_error_quotes_its_spec_in_a_few_hundred_characters(engine):
    cfg = load_config("configs/base.yaml")
    name = {"train": "HorizontalFlip", "gpu": "RandomHorizontalFlip"}[engine]
    cfg["augment"][engine] = [{"name": name, "p": 0.5, "not_an_argument": [list(range(1000))] * 1000}]
    with pytest.raises(ConfigError, match=f"augment.{engine}: {name}") as refused:
        train_transform(cfg) if engine == "train" else gpu_augmenter(cfg)
    assert len(str(refused.value)) <= 420, len(str(refused.value))


# ---- bench/gpu.sh ----

def test_the_gpu_smoke_step_runs_on_cpu_and_writes_its_table(tmp_path):
    """The smoke's stages with CPU-sized overrides (bench/README.md gives the GPU's numbers)."""
    env = {**os.environ, "PY": sys.executable, "WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out")}
    done = subprocess.run(
        ["bash", "bench/gpu.sh", "smoke", "train.device=cpu", "data.image_size=[32,40]", "synth.people=12",
         "synth.eval_people=3", "synth.image_size=[96,128]", "synth.workers=1", "data.num_workers=1", "folds.k=2",
         "model.backbones=[mobilenetv3_small_050]", "train.batch_size=16"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    table = (tmp_path / "out" / "smoke.md").read_text()
    for row in ("| synth |", "| folds |", "| train bf16 |", "| infer bf16 |", "| train fp16 |", "| infer fp16 |",
                "| probabilities |"):
        assert row in table, table
    assert "every value finite" in table
    for precision in ("bf16", "fp16"):
        trained = json.loads(next((tmp_path / "work" / "runs" / f"smoke-{precision}" / "train").rglob("done.json"))
                             .read_text())
        assert trained["epochs_run"] == 2 and trained["identity"]["config"]["augment"]["engine"] == "kornia"
        assert trained["precision"] == precision
