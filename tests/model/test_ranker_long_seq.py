"""Ranker with long-history NS tokens (memory / search): cached path == per-candidate reference."""

from __future__ import annotations

import pytest
import torch

from recsys.longseq.testing import with_long_history
from recsys.model.config import ModelConfig, PyramidConfig
from recsys.model.ranker import OneTransRanker
from recsys.testing import random_request_batch, tiny_schema

SCHEMA = tiny_schema()
LONG = {
    "memory": dict(memory=True, codebook_size=8),
    "hard": dict(search="hard", search_k=3),
    "soft": dict(search="soft", search_k=3),
    "all": dict(memory=True, codebook_size=4, search="both", search_k=2),
}


def make_model(long_seq: dict, pyramid: PyramidConfig | None = None, n_layers: int = 2) -> OneTransRanker:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=n_layers, ffn_mult=2, n_ns_tokens=3, emb_dim=8, head_hidden=16,
                      pyramid=pyramid or PyramidConfig(mode="none"), attention_backend="torch", long_seq=long_seq)
    return OneTransRanker(SCHEMA, cfg, max_s_tokens=24)


@pytest.mark.parametrize("long", sorted(LONG))
@pytest.mark.parametrize("pyramid", [PyramidConfig(mode="none"), PyramidConfig(mode="linear", final=0, round_to=4)])
@pytest.mark.parametrize("hist,old,cands", [
    ([(0, 0)], [0], [1]),                      # no history at all, one candidate
    ([(1, 0), (0, 2), (5, 7)], [0, 1, 30], [1, 7, 2]),  # window only / 1 old event / many old
    ([(11, 6), (0, 0)], [200, 3], [40, 1]),    # long + empty window with old events, many candidates
])
def test_cached_equals_per_candidate_with_long_tokens(long, pyramid, hist, old, cands):
    model = make_model(LONG[long], pyramid, n_layers=3)
    batch = with_long_history(random_request_batch(SCHEMA, hist, cands, seed=len(cands)), SCHEMA, old, seed=1)
    with torch.no_grad():
        tok = model.tokenizer(batch)
        assert tok.ns_tokens.shape == (sum(cands), 3 + model.tokenizer.long.n_tokens, 16)
        torch.testing.assert_close(model.rank(tok), model.rank_per_candidate(tok), rtol=1e-5, atol=1e-5)


def test_default_is_off_and_adds_nothing():
    base = ModelConfig(d_model=16, n_heads=2, n_ns_tokens=3, emb_dim=8, head_hidden=16)
    assert not base.long_seq.enabled
    model = OneTransRanker(SCHEMA, base, max_s_tokens=24)
    assert model.tokenizer.long is None and model.tokenizer.n_ns == 3
    assert not any(".long." in n for n, _ in model.named_parameters())


def test_long_tokens_need_a_long_history():
    model = make_model(LONG["memory"])
    with pytest.raises(ValueError, match="long_max_len"):
        model(random_request_batch(SCHEMA, [(2, 1)], [2]))


def test_long_tokens_depend_on_old_events_and_train():
    """Changing only events older than the window changes the scores (memory and search see them)."""
    model = make_model(LONG["all"])
    base = random_request_batch(SCHEMA, [(3, 2)], [4], seed=2)
    a, b = with_long_history(base, SCHEMA, [50], seed=1), with_long_history(base, SCHEMA, [50], seed=2)
    with torch.no_grad():
        assert not torch.allclose(model(a), model(b))
    model(a).sum().backward()
    long_params = dict(model.tokenizer.long.named_parameters())
    assert all(p.grad is not None for p in long_params.values()), [n for n, p in long_params.items() if p.grad is None]


def test_precomputed_memory_state_equals_built_and_append_is_exact():
    model = make_model(LONG["memory"]).eval()
    batch = with_long_history(random_request_batch(SCHEMA, [(2, 2), (0, 1)], [3, 2], seed=4), SCHEMA, [20, 0], seed=3)
    tokz = model.tokenizer
    with torch.no_grad():
        state = tokz.long_memory_state(batch)
        torch.testing.assert_close(tokz(batch, memory=state).ns_tokens, tokz(batch).ns_tokens)
        # serving-style update: drop request 0's newest old event, then append it in O(1)
        ls = batch.long_seq.to_dict()
        feats = tokz.long_event_features(batch.long_seq)
        old_rows = (ls["in_window"].values() == 0).nonzero().flatten()
        r = int(old_rows[(old_rows < int(ls["in_window"].lengths()[0])).nonzero().max()])
        keep = torch.ones(feats.shape[0], dtype=torch.bool)
        keep[r] = False
        owner = torch.repeat_interleave(torch.arange(2), ls["in_window"].lengths().long())
        mem = tokz.long.memory
        partial = mem.build(feats[keep & (ls["in_window"].values() == 0)], owner[keep & (ls["in_window"].values() == 0)], 2)
        updated = mem.append(partial.select(torch.tensor([0])), feats[r:r + 1])
    torch.testing.assert_close(updated.sums, state.sums[:1], rtol=1e-5, atol=1e-6)
    assert torch.equal(updated.counts, state.counts[:1])
