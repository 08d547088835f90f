"""Cached scorer with long-history NS tokens == per-candidate reference (the S-token cache stays valid)."""

from __future__ import annotations

import pytest
import torch

from recsys.longseq.testing import with_long_history
from recsys.model.config import ModelConfig, PyramidConfig
from recsys.model.ranker import OneTransRanker
from recsys.serving.cache import UserKVCache
from recsys.serving.scorer import CachedScorer
from recsys.testing import random_request_batch, tiny_schema

SCHEMA = tiny_schema()


@pytest.mark.parametrize("long_seq", [dict(memory=True, codebook_size=8), dict(search="both", search_k=3),
                                      dict(memory=True, search="hard")])
def test_cached_scorer_with_long_tokens_equals_reference(long_seq):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=2, ffn_mult=2, n_ns_tokens=3, emb_dim=8, head_hidden=16,
                      pyramid=PyramidConfig(mode="linear", final=0, round_to=2), attention_backend="torch",
                      long_seq=long_seq)
    model = OneTransRanker(SCHEMA, cfg, max_s_tokens=16).eval()
    scorer = CachedScorer(model, UserKVCache(1 << 20), candidate_chunk=3)
    for hist, old, cands in [([(0, 0)], [0], [1]), ([(1, 0), (6, 5)], [40, 3], [7, 2])]:
        batch = with_long_history(random_request_batch(SCHEMA, hist, cands, seed=sum(cands)), SCHEMA, old)
        with torch.no_grad():
            ref = model.rank_per_candidate(model.tokenizer(batch))
        torch.testing.assert_close(scorer.score_batch(batch), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scorer.score_batch(batch), ref, rtol=1e-5, atol=1e-5)  # second time: cache hits
