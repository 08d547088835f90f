"""Summary statistics of request columns: counts, positive rates, history lengths, oracle AUC."""

from __future__ import annotations

import numpy as np

from recsys.data.history import unique_values
from recsys.data.jagged import Jagged
from recsys.data.parquet_io import RequestColumns
from recsys.data.schema import DataSchema


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula, ties get their average rank; NaN if one class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) > 0.5
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average ranks (1-based) over runs of equal scores
    starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    """mean / p50 / p90 / p99 / max / share of zeros of a length array."""
    if lengths.size == 0:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0, "empty_frac": 0.0}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return {"mean": round(float(lengths.mean()), 2), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "max": int(lengths.max()), "empty_frac": round(float((lengths == 0).mean()), 4)}


def summarize(cols: RequestColumns, schema: DataSchema) -> dict:
    """Counts, positive rate and oracle AUC per task, history length stats per kind, of one set of rows.

    ``items`` counts distinct item ids in candidates and histories; ``candidate_items`` in candidates only.
    """
    cand: Jagged = cols["cand_item_id"]
    out: dict = {
        "requests": int(cand.num_rows),
        "candidates": int(len(cand.values)),
        "users": int(np.unique(cols["user_id"]).size),
        "items": int(np.unique(np.concatenate(  # unique_values: no history is built just to be counted
            [cand.values] + [unique_values(cols[schema.seq_col(k, "item_id")]) for k in schema.sequences])).size),
        "candidate_items": int(np.unique(cand.values).size),
        "positive_rate": {},
        "history_length": {k: length_stats(cols[schema.seq_col(k, "ts")].lengths) for k in schema.sequences},
    }
    for task in schema.tasks:
        labels = cols[f"cand_label_{task}"].values
        out["positive_rate"][task] = round(float(labels.mean()), 5) if labels.size else float("nan")
    if schema.has_true_prob:
        out["oracle_auc"] = {t: round(auc(cols[f"cand_prob_{t}"].values, cols[f"cand_label_{t}"].values), 5)
                             for t in schema.tasks}
    return out
