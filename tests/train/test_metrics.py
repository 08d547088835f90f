"""AUC / GAUC / log loss / HR / NDCG against brute-force definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsys.model.metrics import auc, gauc, hr_ndcg_at_k, logloss


def brute_auc(s: np.ndarray, y: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_gauc_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 300
    users = rng.integers(0, 12, n)
    scores = rng.integers(0, 6, n).astype(float)  # many ties on purpose
    labels = (rng.random(n) < 0.4).astype(float)
    assert auc(scores, labels) == pytest.approx(brute_auc(scores, labels), abs=1e-6)  # torchmetrics sums in fp32
    num = den = 0.0
    counted = 0
    for u in np.unique(users):
        m = users == u
        a = brute_auc(scores[m], labels[m])
        if not math.isnan(a):
            num += a * m.sum()
            den += m.sum()
            counted += 1
    g, n_users = gauc(scores, labels, users)
    assert n_users == counted
    assert g == pytest.approx(num / den, abs=1e-9)


def test_gauc_skips_single_class_users_and_handles_none():
    g, n = gauc(np.array([0.1, 0.9, 0.5]), np.array([0.0, 1.0, 1.0]), np.array([1, 1, 2]))
    assert n == 1 and g == 1.0
    g, n = gauc(np.array([0.1, 0.9]), np.array([1.0, 1.0]), np.array([1, 2]))
    assert n == 0 and math.isnan(g)
    assert math.isnan(auc(np.array([0.3, 0.4]), np.array([1, 1])))


def test_logloss_and_ranking_metrics():
    assert logloss(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(math.log(2))
    hr, ndcg = hr_ndcg_at_k(np.array([0, 3, 10, 20]), k=10)
    assert hr == 0.5
    assert ndcg == pytest.approx((1.0 + 1.0 / math.log2(5)) / 4)
