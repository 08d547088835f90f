"""Synthetic long-range signal: off by default (same cache key), planted term == slow reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from recsys.data.config import DataConfig, SyntheticConfig
from recsys.data.jagged import Jagged
from recsys.data.prepare import config_hash, config_key
from recsys.data.schema import DataSchema
from recsys.data.synthetic import generate, long_range_term


def test_default_dataset_key_and_hash_unchanged():
    key = config_key(DataConfig())
    assert "long_range_weight" not in key["synthetic"] and "long_range_window" not in key["synthetic"]
    assert config_hash(DataConfig()) == "d53acd7b34"  # the hash before the option existed (git HEAD ea4ba3e)
    on = DataConfig(synthetic=SyntheticConfig(long_range_weight=2.0))
    assert config_hash(on) != config_hash(DataConfig())


@pytest.mark.parametrize("window", [1, 3, 50])
def test_long_range_term_matches_reference(window):
    rng = np.random.default_rng(window)
    lengths = np.array([0, 1, 4, 9, 30])
    hist = Jagged.from_lengths(rng.integers(1, 6, lengths.sum()), lengths)
    cand_req = np.repeat(np.arange(5), 4)
    cand_cat = rng.integers(1, 7, 20)
    got = long_range_term(hist, window, cand_req, cand_cat)
    for n, (r, c) in enumerate(zip(cand_req, cand_cat)):
        row = hist.values[hist.offsets[r]:hist.offsets[r + 1]].tolist()
        old, recent = row[:max(0, len(row) - window)], row[max(0, len(row) - window):]
        assert got[n] == float(c in old and c not in recent)


def test_weight_shifts_only_the_click_logit_where_the_term_is_one():
    cfg = SyntheticConfig(num_users=60, num_items=300, num_categories=8, history_median=60.0, history_sigma=0.5,
                          requests_per_user=3.0, candidates_per_request=6, signal_window=10, long_range_window=10)
    off, on = generate(cfg), generate(dataclasses.replace(cfg, long_range_weight=3.0))
    term = long_range_term(off.columns[DataSchema.seq_col("click", "category")], 10,
                           off.columns["cand_item_id"].row_ids(), off.columns["cand_category"].values)
    assert 0 < term.mean() < 1  # the task has both kinds of candidates
    p0, p1 = off.columns["cand_prob_click"].values, on.columns["cand_prob_click"].values
    logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
    np.testing.assert_allclose(logit(p1.astype(np.float64)) - logit(p0.astype(np.float64)), 3.0 * term, atol=2e-3)
    np.testing.assert_array_equal(off.columns["cand_item_id"].values, on.columns["cand_item_id"].values)
