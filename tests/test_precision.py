"""train.precision and train.clip_grad, on the CPU: which precision a device gets, fp16's gradient scaler (a step
whose gradients are not finite is skipped and counted, not fatal), clipping of the true gradients, and the scaler's
state across a resume. The GPU smoke check (bench/gpu.sh smoke) runs bf16 and fp16 on a GPU."""
import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.stages import folds
from pipeline.data.dataset import load_train_data
from pipeline.artifacts import train_artifact
from pipeline.train import checkpoint, loop, precision
from tests.conftest import make_config
from tests.test_train import FAST

CUDA = torch.device("cuda")  # a device object only: nothing here runs on it


@pytest.mark.parametrize("name, has_bf16, expected", [
    ("auto", True, "bf16"), ("auto", False, "fp16"), ("fp16", True, "fp16"), ("fp32", False, "fp32"),
    ("bf16", True, "bf16"),
])
def test_auto_picks_bf16_where_the_gpu_has_it_else_fp16(monkeypatch, name, has_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: has_bf16)
    assert precision.resolve(name, CUDA) == expected


def test_bf16_on_a_gpu_without_it_is_refused_naming_the_key_and_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    with pytest.raises(ConfigError, match=r"train\.precision: bf16, but Tesla V100-SXM2-32GB has no bf16; use auto"):
        precision.resolve("bf16", CUDA)


def test_auto_on_the_cpu_is_fp32_and_only_fp16_has_a_scaler():
    cpu = torch.device("cpu")
    assert precision.resolve("auto", cpu) == "fp32"
    assert precision.grad_scaler(cpu, "fp16") is not None
    assert precision.grad_scaler(cpu, "bf16") is None and precision.grad_scaler(cpu, "fp32") is None


def _job(tmp_path, tiny_data, *overrides):
    cfg = make_config(tmp_path, tiny_data, *FAST, "train.ema_decay=0", *overrides)
    folds.run(cfg)
    job = loop.build_job(cfg, "mobilenetv3_small_050", 0, load_train_data(cfg))
    if job.scaler is not None:  # a scale this model's gradients never overflow: the only skips are the test's own
        job.scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    return cfg, job


def _batch(job):
    images, targets = next(iter(job.batches.epoch(0)))
    return job.prepare(images), targets


def _weights(job):
    return [p.detach().clone() for p in job.model.parameters()]


def test_under_fp16_a_step_with_non_finite_gradients_is_skipped_and_the_next_one_is_taken(tmp_path, tiny_data):
    cfg, job = _job(tmp_path, tiny_data, "train.precision=fp16")
    assert job.precision == "fp16" and job.scaler is not None
    images, targets = _batch(job)
    before, scale = _weights(job), job.scaler.get_scale()
    losses, taken = loop._step(cfg, job, images * float("nan"), targets, 0)
    assert not bool(taken)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(job), strict=True))  # the weights stayed
    assert job.scaler.get_scale() == scale / 2  # and the scale came down
    losses, taken = loop._step(cfg, job, images, targets, 1)
    assert bool(taken) and all(np.isfinite(float(v.detach())) for v in losses.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(job), strict=True))


def test_an_epoch_counts_its_skipped_steps_and_keeps_their_losses_out_of_the_means(tmp_path, tiny_data):
    cfg, job = _job(tmp_path, tiny_data, "train.precision=fp16", "train.max_batches=3")
    prepare, calls = job.prepare.forward, []

    def poisoned(images):  # the second batch of the epoch overflows
        calls.append(1)
        out = prepare(images)
        return out * float("inf") if len(calls) == 2 else out

    job.prepare.forward = poisoned
    record = loop.train_one_epoch(cfg, job, 0)
    assert record["skipped_steps"] == 1
    assert all(np.isfinite(record[f"loss_{head}"]) for head in job.criteria)
    assert "1 of 3 steps skipped (fp16: gradients not finite)" in loop._skipped_text(record, job)


def test_an_epoch_whose_every_step_was_skipped_stops_the_job(tmp_path, tiny_data):
    cfg, job = _job(tmp_path, tiny_data, "train.precision=fp16", "train.max_batches=2")
    prepare = job.prepare.forward
    job.prepare.forward = lambda images: prepare(images) * float("nan")
    with pytest.raises(FloatingPointError, match=r"epoch 0: every one of its 2 steps was skipped under fp16"):
        loop.train_one_epoch(cfg, job, 0)


def test_fp32_and_bf16_take_every_step(tmp_path, tiny_data):
    for name in ("fp32", "bf16"):
        cfg, job = _job(tmp_path / name, tiny_data, f"train.precision={name}", "train.max_batches=2")
        assert job.scaler is None and loop.train_one_epoch(cfg, job, 0)["skipped_steps"] == 0


@pytest.mark.parametrize("name", ["fp32", "fp16"])
def test_clip_grad_clips_the_true_gradients_norm(tmp_path, tiny_data, name):
    clip = 1e-3  # far below a random model's gradient norm: always clipped
    cfg, job = _job(tmp_path, tiny_data, f"train.precision={name}", f"train.clip_grad={clip}")
    images, targets = _batch(job)
    loop._step(cfg, job, images, targets, 0)
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in job.model.parameters() if p.grad is not None]))
    assert norm == pytest.approx(clip, rel=1e-2)  # fp16's scaled gradients would be ~65536x this, or ~1/65536x


def test_the_loss_scale_survives_a_resume(tmp_path, tiny_data):
    cfg, job = _job(tmp_path, tiny_data, "train.precision=fp16")
    images, targets = _batch(job)
    loop._step(cfg, job, images * float("nan"), targets, 0)  # the scale comes down once
    artifact = train_artifact(cfg, job.backbone, 0, load_train_data(cfg).fingerprint)
    artifact.folder.mkdir(parents=True)
    checkpoint.save_last(artifact, job, {"epoch": 1})
    _, fresh = _job(tmp_path, tiny_data, "train.precision=fp16")
    fresh.scaler = precision.grad_scaler(fresh.device, "fp16")  # torch's default scale
    assert fresh.scaler.get_scale() != job.scaler.get_scale()
    checkpoint.resume(artifact, fresh)
    assert fresh.scaler.get_scale() == job.scaler.get_scale()


def _without_batch_statistics(model: torch.nn.Module) -> None:
    """Every BatchNorm normalises with its running statistics, in training too: no batch dependence."""
    import types

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
            module.train = types.MethodType(lambda self, mode=True: self, module)


def test_accumulating_two_batches_of_b_is_one_batch_of_2b(tmp_path, tiny_data):
    """train.accumulate: 2 at batch 8 sums the gradients of the 16 images batch 16 takes in one, with the loss
    scaled: the same optimizer steps, schedule and weights, within float tolerance."""
    common = ("model.drop_rate=0", "train.cutmix_p=0", "train.weight_decay=0.01")
    cfg_one, one = _job(tmp_path / "one", tiny_data, *common, "train.batch_size=16", "train.max_batches=2")
    cfg_two, two = _job(tmp_path / "two", tiny_data, *common, "train.batch_size=8", "train.accumulate=2",
                        "train.max_batches=4")
    assert one.steps_per_epoch == two.steps_per_epoch
    for job in (one, two):
        _without_batch_statistics(job.model)
    assert all(torch.equal(a, b) for a, b in zip(_weights(one), _weights(two), strict=True))  # the same start
    first, second = loop.train_one_epoch(cfg_one, one, 0), loop.train_one_epoch(cfg_two, two, 0)
    for a, b in zip(one.model.parameters(), two.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert one.schedule.state_dict() == two.schedule.state_dict()
    for head in one.criteria:
        assert first[f"loss_{head}"] == pytest.approx(second[f"loss_{head}"], rel=1e-5)
    moved = [not torch.equal(a, b) for a, b in zip(_weights(one), _weights(_job(tmp_path / "fresh", tiny_data,
                                                                                   *common)[1]), strict=True)]
    assert any(moved)  # the steps did change the weights


def test_accumulate_larger_than_an_epoch_is_refused_naming_it(tmp_path, tiny_data):
    with pytest.raises(ConfigError, match=r"train\.accumulate: 50 batches per optimizer step"):
        _job(tmp_path, tiny_data, "train.accumulate=50")
