"""Ranking metrics: AUC, GAUC (per-user AUC), log loss, HR@K / NDCG@K.

AUC comes from torchmetrics (a well-kept implementation). GAUC needs per-group AUCs
over possibly hundreds of thousands of users, which torchmetrics does not offer in one
vectorised call, so it is written here with the rank-sum (Mann-Whitney) identity on a
polars ``rank().over(user)``; ``tests/train/test_metrics.py`` checks it against a
brute-force pairwise count, ties included.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import torch
from torchmetrics.functional.classification import binary_auroc


def auc(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Pooled ROC AUC; NaN when only one class is present."""
    s = torch.as_tensor(np.asarray(scores), dtype=torch.float64).flatten()
    y = torch.as_tensor(np.asarray(labels)).flatten().to(torch.int64)
    if s.numel() == 0 or y.min() == y.max():
        return float("nan")
    return float(binary_auroc(s, y))


def gauc(scores: np.ndarray, labels: np.ndarray, users: np.ndarray) -> tuple[float, int]:
    """Impression-weighted mean of per-user AUCs over users that have both classes.

    Returns ``(gauc, users_counted)``; ``(nan, 0)`` when no user has both classes.
    """
    df = pl.DataFrame({"u": np.asarray(users), "s": np.asarray(scores, dtype=np.float64),
                       "y": np.asarray(labels, dtype=np.float64)})
    per_user = (
        df.with_columns(r=pl.col("s").rank("average").over("u"))
        .group_by("u", maintain_order=True)
        .agg(n=pl.len(), pos=pl.col("y").sum(), rank_pos=(pl.col("r") * pl.col("y")).sum())
        .with_columns(neg=pl.col("n") - pl.col("pos"))
        .filter((pl.col("pos") > 0) & (pl.col("neg") > 0))
        .with_columns(auc=(pl.col("rank_pos") - pl.col("pos") * (pl.col("pos") + 1) / 2)
                      / (pl.col("pos") * pl.col("neg")))
    )
    if per_user.height == 0:
        return float("nan"), 0
    w = per_user["n"].to_numpy().astype(np.float64)
    return float((per_user["auc"].to_numpy() * w).sum() / w.sum()), per_user.height


def logloss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    if p.size == 0:
        return float("nan")
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def hr_ndcg_at_k(target_rank: np.ndarray, k: int) -> tuple[float, float]:
    """Leave-one-out HR@K and NDCG@K from the 0-based rank of the single relevant item per user."""
    r = np.asarray(target_rank)
    if r.size == 0:
        return float("nan"), float("nan")
    hit = r < k
    ndcg = np.where(hit, 1.0 / np.log2(r + 2.0), 0.0)
    return float(hit.mean()), float(ndcg.mean())


def binary_report(prefix: str, logits: np.ndarray, labels: np.ndarray, users: np.ndarray) -> dict[str, float]:
    """AUC / GAUC / log loss of one task, keys ``<prefix>auc``, ``<prefix>gauc``, ``<prefix>logloss``."""
    probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    g, n_users = gauc(logits, labels, users)
    out = {f"{prefix}auc": auc(logits, labels), f"{prefix}gauc": g, f"{prefix}gauc_users": n_users,
           f"{prefix}logloss": logloss(probs, labels)}
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
