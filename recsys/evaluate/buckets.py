"""Slice metrics: AUC / GAUC per bucket of a per-row value (history length, item popularity, cold/warm)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from recsys.data.parquet_io import read_parquet_table
from recsys.model.metrics import auc, gauc


def item_counts(files: list[Path], num_items: int) -> np.ndarray:
    """``[num_items]`` int64: how many candidate rows of ``files`` show each item (training popularity)."""
    counts = np.zeros(num_items, dtype=np.int64)
    for f in files:
        items = pc.list_flatten(read_parquet_table(f, ["cand_item_id"]).column("cand_item_id")).to_numpy()
        items = items[(items >= 0) & (items < num_items)]
        counts += np.bincount(items, minlength=num_items)
    return counts


def quantile_buckets(values: np.ndarray, n: int) -> tuple[np.ndarray, list[str]]:
    """Bucket index ``[rows]`` from (deduplicated) quantile edges of ``values``, and a ``"lo-hi"`` label each.

    Labels show the smallest and largest value that actually fell in the bucket; empty buckets are dropped.
    """
    v = np.asarray(values)
    if v.size == 0:
        return np.zeros(0, dtype=np.int64), []
    edges = np.unique(np.quantile(v, np.linspace(0, 1, n + 1)))
    raw = np.searchsorted(edges[1:-1], v, side="right")
    used = np.unique(raw)
    idx = np.searchsorted(used, raw)
    labels = [f"{v[raw == u].min():g}-{v[raw == u].max():g}" for u in used]
    return idx.astype(np.int64), labels


def _clean(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def bucket_metrics(bucket: np.ndarray, labels_of_buckets: list[str], scores: np.ndarray, labels: np.ndarray,
                   users: np.ndarray) -> list[dict]:
    """One dict per bucket: ``bucket``, ``rows``, ``positives``, ``auc``, ``gauc``, ``gauc_users`` (None = undefined)."""
    out = []
    for i, name in enumerate(labels_of_buckets):
        m = bucket == i
        g, n_users = gauc(scores[m], labels[m], users[m]) if m.any() else (float("nan"), 0)
        out.append({"bucket": name, "rows": int(m.sum()), "positives": int(labels[m].sum()),
                    "auc": _clean(auc(scores[m], labels[m])) if m.any() else None,
                    "gauc": _clean(g), "gauc_users": n_users})
    return out


def calibration_table(probs: np.ndarray, labels: np.ndarray, bins: int) -> tuple[list[dict], float]:
    """Equal-width probability bins -> (rows with ``lo, hi, count, mean_pred, pos_rate``, expected calibration error)."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = idx == b
        if not m.any():
            continue
        mp, pr = float(p[m].mean()), float(y[m].mean())
        rows.append({"lo": b / bins, "hi": (b + 1) / bins, "count": int(m.sum()), "mean_pred": mp, "pos_rate": pr})
        ece += m.sum() / p.size * abs(mp - pr)
    return rows, float(ece)
