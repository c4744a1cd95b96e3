"""The label audit: which training labels are most likely wrong, from the pooled out-of-fold probabilities.

cleanlab finds the issues (`cleanlab.filter.find_label_issues`, confident learning) and ranks them by
its label quality score, per head and at the level a label belongs to:
  - gender and age belong to a person: a person's 7 photos vote (their OOF probabilities averaged), so a
    person whose photos mostly disagree with their recorded gender or age band is one suspect, not seven;
  - a mask label belongs to one photo; a person whose `incorrect_mask` photo looks unmasked and whose
    `normal` photo looks masked wrongly is a suspected swap, this data's known error.
Nothing is changed: the suggestions are written in label_fixes.csv's format for a person to review.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import labels

COLUMNS = ("person_id", "id", "field", "recorded", "suggested", "confidence", "quality")


def person_votes(table: pd.DataFrame, probs: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per person: recorded gender and age band, and the mean OOF probabilities of their photos."""
    frame = table[["person_id", "id", "gender", "age_band"]].copy()
    for head in ("gender", "age"):
        for k in range(labels.HEADS[head]):
            frame[f"{head}_p{k}"] = probs[head][:, k]
    people = frame.groupby("person_id", sort=True).agg(
        {"id": "first", "gender": "first", "age_band": "first",
         **{c: "mean" for c in frame.columns if "_p" in c}})
    return people.reset_index()


def _issues(labels_: np.ndarray, pred_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is an issue, quality score) per row: cleanlab's confident-learning filter and self-confidence score."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    pred_probs = np.clip(pred_probs, 1e-6, 1)
    pred_probs = pred_probs / pred_probs.sum(1, keepdims=True)
    present = np.unique(labels_)
    if len(present) < 2:  # cleanlab needs two classes; nothing can be told apart
        return np.zeros(len(labels_), bool), np.ones(len(labels_))
    issue = find_label_issues(labels_, pred_probs, filter_by="prune_by_noise_rate")
    return issue, get_label_quality_scores(labels_, pred_probs)


def audit(table: pd.DataFrame, probs: dict[str, np.ndarray]) -> pd.DataFrame:
    """Every suspect, most suspect first: person_id, id, field, recorded, suggested, confidence, quality,
    images (their files). `table`: the training rows (load_train, with age_band), row-aligned with `probs`."""
    people = person_votes(table, probs)
    files = table.groupby("person_id")["file"].apply(list)
    rows = []
    for head, recorded_col, names in (("gender", "gender", [labels.GENDER_NAMES[g] for g in (0, 1)]),
                                      ("age", "age_band", list(labels.AGE_NAMES))):
        pred = people[[f"{head}_p{k}" for k in range(labels.HEADS[head])]].to_numpy()
        recorded = people[recorded_col].to_numpy()
        issue, quality = _issues(recorded, pred)
        for i in np.flatnonzero(issue):
            guess = int(pred[i].argmax())
            rows.append({"person_id": people.at[i, "person_id"], "id": people.at[i, "id"], "field": head,
                         "recorded": names[recorded[i]], "suggested": names[guess],
                         "confidence": float(pred[i, guess]), "quality": float(quality[i])})
    rows += _mask_swaps(table, probs)
    suspects = pd.DataFrame(rows, columns=list(COLUMNS))
    suspects = suspects.sort_values(["quality", "person_id"], kind="stable").reset_index(drop=True)
    suspects["images"] = [files[p] for p in suspects["person_id"]]
    return suspects


def _mask_swaps(table: pd.DataFrame, probs: dict[str, np.ndarray]) -> list[dict]:
    """Persons whose incorrect_mask photo and normal photo are both mask issues, each predicted as the other."""
    issue, quality = _issues(table["mask"].to_numpy(), probs["mask"])
    predicted = probs["mask"].argmax(1)
    rows = []
    for person, index in table.groupby("person_id").groups.items():
        stems = table.loc[index, "stem"]
        wrong = stems[stems.isin(["incorrect_mask", "normal"])].index
        if len(wrong) == 2 and issue[wrong].all() and predicted[wrong[stems[wrong] == "incorrect_mask"][0]] == 2 \
                and predicted[wrong[stems[wrong] == "normal"][0]] == 1:
            rows.append({"person_id": person, "id": table.at[index[0], "id"], "field": "swap_mask",
                         "recorded": "incorrect_mask:normal", "suggested": "incorrect_mask:normal",
                         "confidence": float(np.mean([probs["mask"][wrong[0]].max(), probs["mask"][wrong[1]].max()])),
                         "quality": float(quality[wrong].mean())})
    return rows


def suggested_fixes(suspects: pd.DataFrame) -> pd.DataFrame:
    """label_fixes.csv's columns (id, field, value, reason); an age fix names the band, for a person to set."""
    values, reasons = [], []
    for row in suspects.itertuples(index=False):
        if row.field == "age":
            # the audit knows a band, not an age: the value is a placeholder the reviewer must replace
            values.append({"<30": "25", "30-old": "45", ">=old": "60"}[row.suggested])
            reasons.append(f"audit: photos look {row.suggested} (p={row.confidence:.2f}), recorded {row.recorded}; "
                           f"REVIEW and write the true age")
        elif row.field == "gender":
            values.append(row.suggested)
            reasons.append(f"audit: photos look {row.suggested} (p={row.confidence:.2f}), recorded {row.recorded}; REVIEW")
        else:
            values.append(row.suggested)
            reasons.append(f"audit: incorrect_mask and normal look swapped (p={row.confidence:.2f}); REVIEW")
    return pd.DataFrame({"id": suspects["id"], "field": suspects["field"], "value": values, "reason": reasons})


def planted_recall(suspects: pd.DataFrame, planted: list[dict], top_k: int) -> dict:
    """Precision and recall of the top-k suspect (person, field) pairs against planted noise."""
    truth = {(n["path"], n["field"]) for n in planted}
    top = list(zip(suspects["person_id"], suspects["field"]))[:top_k]
    hits = sum(pair in truth for pair in top)
    return {"k": top_k, "planted": len(truth), "hits": hits,
            "precision": hits / len(top) if top else 0.0, "recall": hits / len(truth) if truth else 0.0}
