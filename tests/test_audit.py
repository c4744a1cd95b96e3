"""The label audit: planted mislabels are ranked first (and a random model finds them only by chance), a person is
one suspect, a swapped incorrect_mask/normal pair is named, and the suggestions load as label fixes."""
import numpy as np
import pandas as pd
import pytest

from pipeline import labels
from pipeline.data.layout import read_label_fixes
from pipeline.evaluate.audit import audit, planted_recall, suggested_fixes

PEOPLE, PLANTED = 80, 8


def _data(seed: int = 0, model: str = "good"):
    """A training table of PEOPLE people x 7 photos, and OOF probabilities of a model that sees the true labels
    (good) or nothing (random); PLANTED people have a wrong recorded gender or age band."""
    rng = np.random.default_rng(seed)
    true_gender, true_band = rng.integers(0, 2, PEOPLE), rng.integers(0, 3, PEOPLE)
    recorded_gender, recorded_band = true_gender.copy(), true_band.copy()
    planted = []
    for n, p in enumerate(rng.choice(PEOPLE, PLANTED, replace=False)):
        if n % 2:
            recorded_gender[p] = 1 - true_gender[p]
            planted.append({"path": f"p{p:03d}", "field": "gender"})
        else:
            recorded_band[p] = (true_band[p] + 1) % 3
            planted.append({"path": f"p{p:03d}", "field": "age"})
    rows, probs = [], {h: [] for h in labels.HEADS}
    for p in range(PEOPLE):
        for stem in labels.IMAGE_STEMS:
            mask = labels.mask_of(stem)
            rows.append({"person_id": f"p{p:03d}", "id": f"{p:06d}", "file": f"p{p:03d}/{stem}.jpg", "stem": stem,
                         "mask": mask, "gender": recorded_gender[p], "age_band": recorded_band[p]})
            for head, truth in (("mask", mask), ("gender", true_gender[p]), ("age", true_band[p])):
                if model == "good":
                    vector = rng.dirichlet(np.ones(labels.HEADS[head])) * 0.3
                    vector[truth] += 0.7
                else:
                    vector = rng.dirichlet(np.ones(labels.HEADS[head]))
                probs[head].append(vector)
    return pd.DataFrame(rows), {h: np.array(v) for h, v in probs.items()}, planted


def test_the_audit_ranks_the_planted_mislabels_first():
    table, probs, planted = _data()
    suspects = audit(table, probs)
    scores = planted_recall(suspects, planted, PLANTED)
    assert scores["recall"] >= 0.75, scores  # at least 6 of the 8 planted people in the top 8
    assert suspects.groupby(["person_id", "field"]).size().max() == 1  # a person is one suspect per field, not 7


def test_a_model_that_sees_nothing_finds_the_mislabels_only_by_chance():
    table, probs, planted = _data(model="random")
    assert planted_recall(audit(table, probs), planted, PLANTED)["recall"] < 0.5


def test_a_swapped_incorrect_mask_and_normal_pair_is_named():
    table, probs, _ = _data()
    person = table["person_id"] == "p005"
    for stem, looks in (("incorrect_mask", 2), ("normal", 1)):  # each photo looks like the other's label
        row = np.flatnonzero(person & (table["stem"] == stem))[0]
        probs["mask"][row] = np.eye(3)[looks] * 0.96 + 0.01
    suspects = audit(table, probs)
    swaps = suspects[suspects["field"] == "swap_mask"]
    assert list(swaps["person_id"]) == ["p005"] and swaps.iloc[0]["suggested"] == "incorrect_mask:normal"


def test_the_suggested_fixes_load_as_label_fixes_and_name_what_to_review(tmp_path):
    table, probs, _ = _data()
    suspects = audit(table, probs)
    fixes = suggested_fixes(suspects)
    path = tmp_path / "suggested_fixes.csv"
    fixes.to_csv(path, index=False)
    loaded = read_label_fixes(path)  # raises on a value the label fixes would refuse
    assert len(loaded) == len(suspects) > 0 and all("REVIEW" in r for r in loaded["reason"])
    assert set(loaded["field"]) <= {"gender", "age", "swap_mask"}


@pytest.mark.parametrize("k, expected", [(2, 0.5), (4, 0.5)])
def test_planted_recall_counts_person_and_field_pairs(k, expected):
    suspects = pd.DataFrame({"person_id": ["a", "b", "c", "d"], "field": ["age", "gender", "age", "age"]})
    planted = [{"path": "a", "field": "age"}, {"path": "c", "field": "gender"}]
    assert planted_recall(suspects, planted, k)["recall"] == expected
