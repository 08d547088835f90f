"""Memory-state cache: growing histories extend the cached state (O(new events)) and score like a rebuild."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from recsys.data.collate import collate
from recsys.longseq.cache import LongMemoryCache
from recsys.model.config import ModelConfig, PyramidConfig
from recsys.model.ranker import OneTransRanker
from recsys.serving.cache import UserKVCache
from recsys.serving.scorer import CachedScorer
from recsys.testing import tiny_schema

SCHEMA = tiny_schema(kinds=("click", "like"))


def user_events(n: dict[str, int], seed: int = 0) -> dict[str, list[tuple[int, int, int, int]]]:
    rng = np.random.default_rng(seed)
    return {k: [(int(rng.integers(1, SCHEMA.num_items)), int(rng.integers(1, SCHEMA.num_categories)),
                 int(rng.integers(1, SCHEMA.num_actions)), int(t)) for t in np.sort(rng.integers(0, 10**6, n[k]))]
            for k in SCHEMA.sequences}


def rows_table(requests: list[tuple[int, dict[str, list]]], n_cand: int = 3) -> pa.Table:
    """``requests``: (user, events per kind) -> one request row each (histories oldest first)."""
    data: dict[str, list] = {"request_id": list(range(len(requests))), "user_id": [u for u, _ in requests],
                             "request_ts": [10**7] * len(requests)}
    for f in SCHEMA.sparse:
        data[f.name] = [1] * len(requests)
    for dn in SCHEMA.dense:
        data[dn] = [0.5] * len(requests)
    for k in SCHEMA.sequences:
        for j, fld in enumerate(("item_id", "category", "action", "ts")):
            data[SCHEMA.seq_col(k, fld)] = [[e[j] for e in ev[k]] for _, ev in requests]
    data["cand_item_id"] = [[1 + i for i in range(n_cand)]] * len(requests)
    data["cand_category"] = [[1 + i % 5 for i in range(n_cand)]] * len(requests)
    for t in SCHEMA.tasks:
        data[f"cand_label_{t}"] = [[0.0] * n_cand] * len(requests)
    return pa.Table.from_pydict(data, schema=SCHEMA.arrow_schema())


def make_model() -> OneTransRanker:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=2, ffn_mult=2, n_ns_tokens=3, emb_dim=8, head_hidden=16,
                      pyramid=PyramidConfig(mode="none"), attention_backend="torch",
                      long_seq=dict(memory=True, codebook_size=8))
    return OneTransRanker(SCHEMA, cfg, max_s_tokens=64).eval()


# Window 3. First passes: miss (user 1 new), hit (2 clicks: nothing old yet), miss (user 2 new), append,
# hit (same history), append, append. Second passes: 4 hits, then for the last batch the cache holds the
# 40-click state, so its 10-click request is a miss and the next two append again.
@pytest.mark.parametrize("long_max_len,expect", [(1000, {"miss": 2 + 1, "append": 3 + 2, "hit": 2 + 4}),
                                                 (12, None)])  # 12: truncation -> rebuilds, still exact
def test_cached_memory_equals_rebuild_over_growing_histories(long_max_len, expect):
    model = make_model()
    full = {1: user_events({"click": 40, "like": 9}, seed=1), 2: user_events({"click": 5, "like": 0}, seed=2)}
    # user 1 grows 0 -> 2 -> 10 -> 10 (same history again) -> 25 -> 40 clicks; user 2 appears once, window only
    steps = [(1, {"click": 0, "like": 0}), (1, {"click": 2, "like": 1}), (2, {"click": 5, "like": 0}),
             (1, {"click": 10, "like": 4}), (1, {"click": 10, "like": 4}), (1, {"click": 25, "like": 4}),
             (1, {"click": 40, "like": 9})]
    requests = [(u, {k: full[u][k][:n[k]] for k in SCHEMA.sequences}) for u, n in steps]
    mem_cache = LongMemoryCache()
    scorer = CachedScorer(model, UserKVCache(1 << 20), candidate_chunk=2, memory_cache=mem_cache)
    table = rows_table(requests)
    for lo, hi in [(0, 1), (1, 3), (3, 4), (4, 7)]:  # batches; the last one holds the same user three times
        batch = collate(table.slice(lo, hi - lo), SCHEMA, max_len=3, long_max_len=long_max_len)
        with torch.no_grad():
            ref = model.rank_per_candidate(model.tokenizer(batch))
            rebuilt = model.tokenizer.long_memory_state(batch)
        torch.testing.assert_close(scorer.score_batch(batch), ref, rtol=1e-5, atol=1e-5)
        cached = mem_cache.states(model.tokenizer, batch)  # second pass over the batch: all hits
        torch.testing.assert_close(cached.sums, rebuilt.sums, rtol=1e-5, atol=1e-5)
        assert torch.equal(cached.counts, rebuilt.counts)
    if expect is not None:
        assert mem_cache.counts == expect
    else:
        assert mem_cache.counts["miss"] > 2  # the sliding long_max_len forces rebuilds


def test_lru_bound():
    model = make_model()
    cache = LongMemoryCache(max_users=2)
    reqs = [(u, user_events({"click": 6, "like": 1}, seed=u)) for u in (1, 2, 3)]
    cache.states(model.tokenizer, collate(rows_table(reqs), SCHEMA, 2, 100))
    assert list(cache.entries) == [2, 3]
    cache.clear()
    assert not cache.entries
