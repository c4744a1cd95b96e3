"""The macro-F1 decision rule: per-class offsets that beat the argmax where it is not F1-optimal, measured honestly."""
import numpy as np
from sklearn.metrics import f1_score

from pipeline.evaluate.decision import decide, fit_offsets, macro_f1, nested_gain


def _rare_class_case(seed=0, n=600):
    """Three classes; class 2 is rare and its probabilities are always under-confident, so the argmax never
    picks it, while a small offset for class 2 finds most of them."""
    rng = np.random.default_rng(seed)
    label = rng.choice(3, n, p=[0.6, 0.35, 0.05])
    probs = rng.dirichlet(np.ones(3) * 2, n) * 0.3
    probs[np.arange(n), label] += 0.4
    probs[label == 2, 0] += 0.5  # the rare class always looks more like class 0
    return probs / probs.sum(1, keepdims=True), label


def test_macro_f1_is_scikit_learns():
    probs, label = _rare_class_case()
    predicted = probs.argmax(1)
    assert abs(macro_f1(label, predicted, 3) - f1_score(label, predicted, labels=[0, 1, 2], average="macro",
                                                           zero_division=0)) < 1e-12


def test_offsets_change_decisions_where_the_argmax_is_not_f1_optimal():
    probs, label = _rare_class_case()
    assert (decide(probs) == 2).sum() <= 2  # the argmax (almost) never predicts the rare class
    offsets = fit_offsets(probs, label)
    assert (decide(probs, offsets) == 2).sum() > (label == 2).sum() / 2
    assert macro_f1(label, decide(probs, offsets), 3) > macro_f1(label, decide(probs), 3) + 0.1


def test_the_gain_is_measured_on_folds_the_offsets_never_saw():
    probs, label = _rare_class_case()
    fold = np.arange(len(label)) % 5
    gain = nested_gain(probs, label, fold)
    assert gain["argmax_f1"] < gain["nested_f1"] <= gain["fitted_on_all_f1"] + 1e-9
    noise = np.random.default_rng(1).dirichlet(np.ones(3), len(label))  # a model that knows nothing
    honest = nested_gain(noise, label, fold)
    assert honest["nested_f1"] < honest["fitted_on_all_f1"]  # fitted-and-scored on one table flatters


def test_the_summary_labels_the_oof_as_optimistic_and_prints_the_nested_estimates(gate_run):
    import json

    from pipeline.stages import summary

    report = json.loads((gate_run["tmp"] / "run" / "ensemble.json").read_text())
    text = summary.run(gate_run["cfg"])
    assert "OOF F1 above is optimistic" in text
    honest = next(line for line in text.splitlines() if line.startswith("honest (nested over folds)"))
    assert f"weights fitted on other folds {report['ensemble']['nested_weights_f1']:.4f}" in honest
    assert f"decision offsets fitted on other folds {report['decision']['nested_f1']:.4f}" in honest
