"""Synthetic generator: determinism, the planted model, label consistency."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
from data_helpers import load_data_config

from recsys.data.prepare import prepare_dataset
from recsys.data.stats import auc
from recsys.data.synthetic import generate


def _tables(prepared):
    return {s: [pq.read_table(f) for f in files] for s, files in prepared.splits.items()}


def test_same_seed_identical_parquet_different_seed_differs(tmp_path):
    a = prepare_dataset(load_data_config("tiny", root=str(tmp_path / "a")), progress=False)
    b = prepare_dataset(load_data_config("tiny", root=str(tmp_path / "b")), progress=False)
    c = prepare_dataset(load_data_config("tiny", root=str(tmp_path / "c"), **{"synthetic.seed": 1}), progress=False)
    for split in a.splits:
        for fa, fb in zip(a.splits[split], b.splits[split]):
            assert fa.read_bytes() == fb.read_bytes()
    ta, tc = _tables(a), _tables(c)
    assert not ta["train"][0].equals(tc["train"][0])
    assert a.path.name != c.path.name  # the seed is part of the cache key


def test_planted_probabilities_and_labels(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg.synthetic, num_users=300)  # ~2.4k requests, ~15k candidates
    data = generate(cfg)
    cols = data.columns
    click, like = cols["cand_label_click"].values, cols["cand_label_like"].values
    p_click, p_like = cols["cand_prob_click"].values, cols["cand_prob_like"].values
    assert np.all(like <= click)  # like implies click
    assert np.all(p_like <= p_click + 1e-7) and np.all((p_click > 0) & (p_click < 1))
    # calibrated: the mean label matches the mean true probability (Bernoulli draws)
    assert abs(click.mean() - p_click.mean()) < 0.02
    # the signal is learnable: true probabilities separate the labels well
    assert auc(p_click, click) > 0.7
    # and it is carried by the visible history: candidates in the user's most recent category click more
    hist = cols["seq_click_category"]
    last_cat = np.where(hist.lengths > 0, hist.values[np.maximum(hist.offsets[1:] - 1, 0)], -1)
    cand_req = cols["cand_item_id"].row_ids()
    same = cols["cand_category"].values == last_cat[cand_req]
    assert p_click[same].mean() > p_click[~same].mean() + 0.1


def test_history_lengths_heavy_tailed():
    from recsys.data.config import SyntheticConfig
    from recsys.data.synthetic import _history_lengths
    n = _history_lengths(SyntheticConfig(num_users=20000, max_history=10000), np.random.default_rng(0))
    assert n.max() == 10000 and np.median(n) < 60 and n.mean() > 2 * np.median(n)


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    y = rng.random(60) < 0.4
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert abs(auc(s, y) - pairwise) < 1e-12
