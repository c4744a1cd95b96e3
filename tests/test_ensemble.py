"""Soft voting, OOF-fitted weights and TTA, on probability tables alone."""
import inspect

import numpy as np
import pytest
import torch

from pipeline import labels
from pipeline.config import load_config
from pipeline.evaluate import ensemble
from pipeline.stages import ensemble as ensemble_stage
from pipeline.train.model import MaskNet
from pipeline.train.predict import eval_normalize, predict
from pipeline.train.views import tta_views


def member(seed, n=200):
    rng = np.random.default_rng(seed)
    heads = {h: rng.dirichlet(np.ones(k), size=n) for h, k in labels.HEADS.items()}
    return {**heads, "joint": labels.joint_from_heads(heads["mask"], heads["gender"], heads["age"])}


def informative_and_confident_noise(label, seed):
    """A member that is mildly right and one that is confidently random: equal weights lose to the first."""
    n = len(label)
    good, noise = member(seed, n), member(seed + 1, n)
    good["joint"][np.arange(n), label] += 0.1
    noise["joint"][np.arange(n), np.random.default_rng(seed).integers(0, 18, n)] += 1.0
    return good, noise


@pytest.mark.parametrize("mode", ["joint", "heads"])
def test_an_ensemble_of_identical_members_equals_the_member(mode):
    one = member(0)
    combined = ensemble.combine([one, one, one], [0.2, 0.3, 0.5], mode)
    for key in ("mask", "gender", "age", "joint"):
        np.testing.assert_allclose(combined[key], one[key], rtol=1e-10, atol=1e-12)


def test_fitted_weights_depend_on_oof_alone():
    rng = np.random.default_rng(1)
    label = rng.integers(0, 18, 200)
    good, noise = informative_and_confident_noise(label, 2)
    weights = ensemble.fit_weights([good, noise], label, 0.1, "joint")
    assert weights[0] > weights[1]
    # by signature the fit sees OOF tables and labels only: there is no way to hand it eval data
    assert list(inspect.signature(ensemble.fit_weights).parameters) == ["oof_members", "label", "step", "mode"]


def test_ensemble_weights_do_not_change_when_eval_probabilities_change(gate_run, tmp_path):
    """A finished run, then its eval images mirrored: infer predicts them again, the submission changes, and the
    fitted weights stay exactly what the OOF tables alone give (no stage function replaced)."""
    import shutil

    import cv2

    from pipeline.evaluate.tables import oof_table, pool_folds, probs_of
    from pipeline.data.dataset import train_fingerprint
    from pipeline.data.layout import load_train
    from pipeline.stages import infer
    from tests.conftest import GATE_RUN, make_config

    for sub in ("data", "run", "folds", "cache"):
        shutil.copytree(gate_run["tmp"] / sub, tmp_path / sub)
    cfg = make_config(tmp_path, tmp_path / "data", *GATE_RUN, "ensemble.weights=fit", "ensemble.weight_step=0.1")
    first = ensemble_stage.run(cfg)
    before = np.load(tmp_path / "run" / "ensemble_probs.npz")["eval_joint"]
    table, _ = load_train(cfg)
    fingerprint = train_fingerprint(cfg, table)
    tta = [probs_of(pool_folds({f: tmp_path / "run" / "infer" / b / f"fold{f}" / "val_probs_tta.npz" for f in range(2)}))
           for b in cfg["model"]["backbones"]]
    label = oof_table(cfg, cfg["model"]["backbones"][0], table, fingerprint)["label"]
    expected = ensemble.backbone_weights(tta, label, cfg["ensemble"])
    assert first["weights"] == {b: float(w) for b, w in zip(cfg["model"]["backbones"], expected)}
    for image in (tmp_path / "data" / "eval" / "images").iterdir():
        cv2.imwrite(str(image), cv2.imread(str(image))[::-1])  # other eval pixels: other eval probabilities
    infer.run(cfg)
    second = ensemble_stage.run(cfg)
    assert np.abs(np.load(tmp_path / "run" / "ensemble_probs.npz")["eval_joint"] - before).max() > 1e-3
    assert second["weights"] == first["weights"]


def test_simplex_grid_covers_weights_that_sum_to_one():
    grid = list(ensemble.simplex_grid(3, 0.5))
    assert len(grid) == 6
    assert all(np.isclose(w.sum(), 1) for w in grid)


def _predict(model, images: np.ndarray, tta) -> dict:
    """predict over uint8 HWC images from a host store, on CPU, one forward per batch of 2."""
    cfg = load_config("configs/demo.yaml")
    return predict(model, images, np.arange(len(images)), eval_normalize(cfg, torch.device("cpu")), 2, tta=tta)


def test_hflip_tta_averages_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = MaskNet("resnet10t", "multihead").eval()
    image = np.random.default_rng(0).integers(0, 256, (40, 16, 3), dtype=np.uint8)
    mirror = image[:, ::-1]
    with_tta = _predict(model, np.stack([image]), ("none", "hflip"))
    plain = _predict(model, np.stack([image, mirror]), ("none",))
    for key in with_tta:
        np.testing.assert_allclose(with_tta[key][0], plain[key].mean(0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain["joint"][0], plain["joint"][1], atol=1e-4)  # the mirror is another view


def test_flip_tta_on_a_symmetric_input_changes_nothing():
    torch.manual_seed(0)
    model = MaskNet("resnet10t", "multihead").eval()
    half = np.random.default_rng(1).integers(0, 256, (40, 8, 3), dtype=np.uint8)
    image = np.concatenate([half, half[:, ::-1]], axis=1)  # (H, W, C), mirror-symmetric in W
    plain = _predict(model, np.stack([image, image]), ("none",))
    flipped = _predict(model, np.stack([image, image]), ("none", "hflip"))
    for key in plain:
        np.testing.assert_allclose(plain[key], flipped[key], rtol=1e-5, atol=1e-6)


def test_tta_views_in_one_forward_equal_one_forward_per_view():
    """Views sharing a shape go through the model as one batch; a scale view goes alone. Same numbers."""
    torch.manual_seed(0)
    model = MaskNet("resnet10t", "multihead").eval()
    images = np.random.default_rng(2).integers(0, 256, (3, 40, 32, 3), dtype=np.uint8)
    tta = ("none", "hflip", "scale:1.25")
    together = _predict(model, images, tta)
    normalize = eval_normalize(load_config("configs/demo.yaml"), torch.device("cpu"))
    with torch.no_grad():
        views = tta_views(normalize(torch.from_numpy(images)), tta)
        one_by_one = [labels.probabilities(model(view), "multihead") for view in views]
    for key in together:
        expected = sum(view[key] for view in one_by_one) / len(views)
        np.testing.assert_allclose(together[key], expected.numpy(), rtol=1e-4, atol=1e-5)


def test_scale_tta_views_keep_the_batch():
    x = torch.rand(2, 3, 40, 32)
    views = tta_views(x, ["none", "hflip", "scale:1.25"])
    assert [v.shape[0] for v in views] == [2, 2, 2] and views[2].shape[2:] == (50, 40)
    with pytest.raises(ValueError, match="vflip"):
        tta_views(x, ["vflip"])
