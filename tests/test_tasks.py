"""Per-task models (model.tasks): a backbone that trains some heads only, and an ensemble that weighs each
member per head, only where it predicts."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import labels
from pipeline.artifacts import EVAL_PROBS, infer_artifact, train_artifact
from pipeline.config import load_config
from pipeline.data.dataset import eval_identity, train_fingerprint
from pipeline.data.images import cached_images
from pipeline.data.layout import load_eval, load_train
from pipeline.data.pixels import image_set
from pipeline.errors import ConfigError
from pipeline.evaluate.ensemble import backbone_weights, combine, fit_head_weights
from pipeline.evaluate.tables import mean_of_folds
from pipeline.gate.runtime import Gate
from pipeline.io import load_npz
from pipeline.stages import ensemble, export, folds, infer, oof, summary, synth, train
from pipeline.train.model import build_model
from tests.conftest import GATE_RUN, make_config

AGE_ONLY = "regnetx_002"


@pytest.fixture(scope="module")
def tasks_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tasks")
    cfg = make_config(tmp, tmp / "data", *GATE_RUN, f"model.tasks={{{AGE_ONLY}: [age]}}", "ensemble.combine=heads")
    for stage in (synth, folds, train, oof, infer):
        stage.run(cfg)
    return {"cfg": cfg, "tmp": tmp, "report": ensemble.run(cfg)}


def test_a_head_only_backbone_has_logits_and_tables_for_its_heads_only(tasks_run):
    cfg = tasks_run["cfg"]
    model = build_model(cfg, AGE_ONLY, for_inference=True)
    assert model.heads == ("age",) and model.head[-1].out_features == labels.NUM_AGE
    val = load_npz(tasks_run["tmp"] / "run" / "train" / AGE_ONLY / "fold0" / "val_probs.npz")
    assert {k for k in val if k.startswith("probs_")} == {"probs_age"}
    full = load_npz(tasks_run["tmp"] / "run" / "train" / "mobilenetv3_small_050" / "fold0" / "val_probs.npz")
    assert {k for k in full if k.startswith("probs_")} == {f"probs_{k}" for k in labels.TABLE_KEYS}
    stamp = json.loads((tasks_run["tmp"] / "run" / "train" / AGE_ONLY / "fold0" / "done.json").read_text())
    assert "val_f1_mask" not in stamp["history"][0] and "val_f1_age" in stamp["history"][0]


def test_the_ensemble_gives_a_head_only_member_weight_only_on_its_heads(tasks_run):
    report, cfg = tasks_run["report"], tasks_run["cfg"]
    assert set(report["weights"][AGE_ONLY]) == {"age"}
    assert set(report["weights"]["mobilenetv3_small_050"]) == set(labels.HEADS)
    assert report["weights"]["mobilenetv3_small_050"]["mask"] == 1.0  # the only member with a mask head
    assert report["weights"]["mobilenetv3_small_050"]["age"] + report["weights"][AGE_ONLY]["age"] == pytest.approx(1)
    assert "f1_mask" not in report["members"][AGE_ONLY]["oof"]
    text = summary.run(cfg)
    assert "a per-task member" in text
    row = next(line for line in text.splitlines() if line.startswith(AGE_ONLY))
    assert f"{AGE_ONLY} age {report['weights'][AGE_ONLY]['age']:.2f} " in " ".join(row.split()) + " "
    assert row.split()[3].endswith("*")  # its F1: the mean of its heads, marked


def test_the_bundle_votes_per_head_as_the_ensemble_stage(tasks_run):
    cfg = tasks_run["cfg"]
    folder = export.run(cfg)
    table, _ = load_train(cfg)
    eval_table, _ = load_eval(cfg)
    fingerprint, eval_key = train_fingerprint(cfg, table), eval_identity(cfg, eval_table)
    ids = eval_table["ImageID"].to_numpy().astype(str)
    members = [mean_of_folds({f: infer_artifact(cfg, b, f, train_artifact(cfg, b, f, fingerprint).read_stamp()["token"],
                                                eval_key).path(EVAL_PROBS) for f in range(cfg["folds"]["k"])}, ids, b)
               for b in cfg["model"]["backbones"]]
    report = tasks_run["report"]
    weights = {h: [report["weights"][b].get(h, 0.0) for b in cfg["model"]["backbones"]] for h in labels.HEADS}
    expected = combine(members, weights, "heads")
    got = Gate(folder).classify(np.asarray(cached_images(cfg, image_set(cfg, "eval", eval_table["file"]))))
    for key in labels.TABLE_KEYS:
        assert np.abs(got[key] - expected[key]).max() < 1e-4, key


def test_per_head_weights_pick_each_heads_best_member():
    rng = np.random.default_rng(0)
    label = rng.integers(0, labels.NUM_CLASSES, 400)
    mask, gender, age = labels.decompose(label)
    truth = {"mask": mask, "gender": gender, "age": age}

    def table(good: set) -> dict:  # right where good, confidently wrong elsewhere: equal weights lose
        out = {}
        for head, size in labels.HEADS.items():
            wrong = np.eye(size)[(truth[head] + 1) % size]
            out[head] = 0.9 * (np.eye(size)[truth[head]] if head in good else wrong) + 0.1 / size
        out["joint"] = labels.joint_from_heads(out["mask"], out["gender"], out["age"])
        return out

    members = [table({"mask", "gender"}), table({"age"}), {"age": table(set())["age"]}]
    weights = fit_head_weights(members, label, 0.5)
    assert list(weights["mask"]) == [1, 0, 0]  # the third member has no mask head: never a weight there
    assert list(weights["age"]) == [0, 1, 0]   # each head its own best member, fitted alone
    equal_f1 = combine(members, {h: [1 / 3] * 3 if h == "age" else [0.5, 0.5, 0] for h in labels.HEADS}, "heads")
    assert (equal_f1["age"].argmax(1) != truth["age"]).all()  # the case is one where equal weights are wrong
    equal = backbone_weights(members, label, {"weights": "equal", "combine": "heads", "weight_step": 0.5})
    assert list(equal["mask"]) == [0.5, 0.5, 0.0] and list(equal["age"]) == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("overrides, message", [
    (["model.tasks={regnetx_002: [age]}"], "ensemble.combine = 'joint': must be heads"),
    (["model.tasks={regnetx_002: [age], mobilenetv3_small_050: [age]}", "ensemble.combine=heads"],
     "no backbone predicts the mask head"),
    (["model.tasks={efficientnet_b0: [age]}", "ensemble.combine=heads"], "'efficientnet_b0', which is not in model.backbones"),
    (["model.tasks={regnetx_002: [age]}", "ensemble.combine=heads", "model.head=single"], "need model.head: multihead"),
    (["model.tasks={regnetx_002: [height]}", "ensemble.combine=heads"], "model.tasks"),
])
def test_a_per_task_config_that_cannot_vote_is_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config("configs/demo.yaml", overrides)
