"""synthetic.cold_item_fraction: cold items only among test candidates; the default dataset is unchanged."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from recsys.data.config import DataConfig, SyntheticConfig
from recsys.data.prepare import config_hash, config_key
from recsys.data.schema import DataSchema
from recsys.data.synthetic import cold_item_mask, generate, make_world
from recsys.quant.content import synthetic_content
from tests.quant.conftest import tiny_data_config


def world_of(cfg: SyntheticConfig):
    return make_world(cfg, np.random.default_rng(np.random.SeedSequence(cfg.seed).spawn(5)[0]))


def test_cold_items_appear_only_as_test_candidates(tmp_path):
    cfg = dataclasses.replace(tiny_data_config(tmp_path).synthetic, cold_item_fraction=0.2)
    data = generate(cfg)
    cold = cold_item_mask(cfg, world_of(cfg))
    assert cold.sum() == 40 and not cold[0]
    cand = data.columns["cand_item_id"]
    split = np.repeat(data.split, cand.lengths)
    assert not cold[cand.values[split != 2]].any()
    assert cold[cand.values[split == 2]].any()
    for kind in cfg.sequences:
        assert not cold[data.columns[DataSchema.seq_col(kind, "item_id")].values].any()


def test_cold_fraction_zero_keeps_rows_and_cache_key():
    base = DataConfig()
    assert "cold_item_fraction" not in config_key(base)["synthetic"]
    on = dataclasses.replace(base, synthetic=dataclasses.replace(base.synthetic, cold_item_fraction=0.1))
    assert config_key(on)["synthetic"]["cold_item_fraction"] == 0.1 and config_hash(on) != config_hash(base)
    with pytest.raises(ValueError, match="cold_item_fraction"):
        SyntheticConfig(cold_item_fraction=1.0)


def test_synthetic_content_is_deterministic_and_clustered_by_category(tmp_path):
    cfg = tiny_data_config(tmp_path).synthetic
    ids, x = synthetic_content(cfg, 8, 0.1, 0.0, 0.0)
    _, y = synthetic_content(cfg, 8, 0.1, 0.0, 0.0)
    assert np.array_equal(x.numpy(), y.numpy()) and ids.tolist() == list(range(1, cfg.num_items + 1))
    cat = world_of(cfg).item_category[1:]
    same = cat[:, None] == cat[None, :]
    d = ((x[:, None] - x[None]) ** 2).sum(-1).numpy()
    assert d[same].mean() < 0.2 * d[~same].mean()
