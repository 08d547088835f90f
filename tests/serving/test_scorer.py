"""Cached scoring == uncached per-candidate scoring; cross-request reuse is exact and counted right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from serving_helpers import (
    SCHEMA,
    Row,
    collate_rows,
    history_before,
    make_model,
    random_cands,
    random_history,
)

from recsys.model.config import PyramidConfig
from recsys.serving.cache import UserKVCache
from recsys.serving.events import merged_events
from recsys.serving.scorer import CachedScorer, occurrence_waves, score_in_chunks
from recsys.testing import random_request_batch

PYRAMIDS = {
    "none": PyramidConfig(mode="none"),
    "linear": PyramidConfig(mode="linear", final=0, round_to=2),
    "explicit": PyramidConfig(mode="explicit", queries=[10, 4, 0]),
    "explicit1": PyramidConfig(mode="explicit", queries=[5]),  # one layer: its budget is ignored (top layer)
}


def reference(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.rank_per_candidate(model.tokenizer(batch))


CASES = [
    ([(0, 0)], [1]),                        # empty history, one candidate
    ([(1, 0), (0, 1), (6, 5)], [7, 1, 3]),  # lengths 1, 1, 11
    ([(9, 3), (0, 0)], [7, 7]),             # long + empty
]


@pytest.mark.parametrize("d_model", [16, 32], ids=["dh8_aten", "dh16_native"])
@pytest.mark.parametrize("n_layers,pyramid", [(1, "none"), (1, "linear"), (1, "explicit1"), (3, "none"),
                                              (3, "linear"), (3, "explicit")])
def test_cached_equals_per_candidate(n_layers, pyramid, d_model):
    """encode_prefix once + chunked score_candidates (any chunk) == each candidate alone through [S ; NS]; head
    dim 8 runs ATen's CPU attention, 16 the native kernels (kernels/cpu_native.py)."""
    model = make_model(n_layers, PYRAMIDS[pyramid], max_s=16, d_model=d_model)
    for hist, cands in CASES:
        batch = random_request_batch(SCHEMA, hist, cands, seed=sum(cands))
        with torch.no_grad():
            tok = model.tokenizer(batch)
            slow = model.rank_per_candidate(tok)
            prefix = model.encode_prefix(tok.s_tokens, tok.s_offsets)
            for chunk in (1, 3, 512):
                fast = score_in_chunks(model, prefix, tok.ns_tokens, tok.cand_offsets, chunk)
                torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
                cached = CachedScorer(model, UserKVCache(1 << 20), candidate_chunk=chunk).score_batch(batch)
                torch.testing.assert_close(cached, slow, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pyramid", ["none", "linear"])
def test_dense_bf16_cached_equals_per_candidate_within_bf16_rounding(pyramid):
    """``model.dense_bf16``: the cached scorer still equals the per-candidate path (bf16 tolerance: the two group
    rows into different matmuls), and the option is not ignored (scores differ from fp32)."""
    model = make_model(3, PYRAMIDS[pyramid], max_s=16, d_model=32, dense_bf16=True)
    fp32 = make_model(3, PYRAMIDS[pyramid], max_s=16, d_model=32)  # the same weights (same seed)
    batch = random_request_batch(SCHEMA, [(1, 0), (0, 1), (6, 5)], [7, 1, 30], seed=3)
    slow = reference(model, batch)
    cached = CachedScorer(model, UserKVCache(1 << 20), candidate_chunk=4).score_batch(batch)
    torch.testing.assert_close(cached, slow, rtol=2e-2, atol=2e-2)
    want = reference(fp32, batch)
    torch.testing.assert_close(slow, want, rtol=5e-2, atol=5e-2)
    assert not torch.equal(slow, want)


@pytest.mark.parametrize("pyramid", ["none", "linear"])
def test_thousand_candidates_chunked(pyramid):
    model = make_model(3, PYRAMIDS[pyramid], max_s=16)
    batch = random_request_batch(SCHEMA, [(3, 2), (0, 0), (1, 0)], [1000, 1, 7], seed=5)
    with torch.no_grad():
        tok = model.tokenizer(batch)
        prefix = model.encode_prefix(tok.s_tokens, tok.s_offsets)
        slow = model.rank_per_candidate(tok)
        for chunk in (64, 333, 1008):
            torch.testing.assert_close(score_in_chunks(model, prefix, tok.ns_tokens, tok.cand_offsets, chunk), slow,
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merge", ["time_interleaved", "intent_grouped"])
def test_events_follow_tokenizer_merge(merge):
    """Event identities come out in exactly the tokenizer's merged S order (ties across kinds included):
    feed the tokenizer's merge the event index as a token value and read the order back."""
    model = make_model(1, seq_merge=merge)
    rng = np.random.default_rng(0)
    rows = []
    for u in range(3):
        hist = {k: [(int(rng.integers(1, 50)), 1, 1, int(t)) for t in np.sort(rng.integers(0, 6, size=n))]
                for k, n in zip(SCHEMA.sequences, rng.integers(0, 6, size=2))}  # many equal time stamps
        rows.append(Row(u, 10**6, hist, random_cands(rng, 1)))
    batch = collate_rows(rows)
    values, offsets = merged_events(batch, list(SCHEMA.sequences), merge)
    ts = batch.seq_ts.to_dict()
    per_kind, lengths, times, ident, start = [], [], [], [], 0
    for k in SCHEMA.sequences:
        n = int(ts[k].lengths().sum())
        tok = torch.zeros(n, 16)
        tok[:, 0] = torch.arange(start, start + n, dtype=torch.float32) + 1  # 1-based id, 0 = SEP
        per_kind.append(tok)
        lengths.append(ts[k].lengths().to(torch.int64))
        times.append(ts[k].values())
        seq = batch.seq.to_dict()
        ident.append(np.stack([np.full(n, SCHEMA.sequences.index(k)), seq[f"{k}.item_id"].values().numpy(),
                               seq[f"{k}.category"].values().numpy(), seq[f"{k}.action"].values().numpy(),
                               ts[k].values().numpy()], 1))
        start += n
    with torch.no_grad():
        merged, s_len = model.tokenizer._merge(per_kind, lengths, times)
    ids = merged[:, 0].round().long().numpy()
    assert np.diff(offsets).tolist() == s_len.tolist()
    ident = np.concatenate(ident)
    for pos, i in enumerate(ids):
        if i == 0:
            assert values[pos, 1] == -1  # a SEP row
        else:
            np.testing.assert_array_equal(values[pos], ident[i - 1])


def user_requests(rng, counts, cut_times, max_len=1000, n_cands=3, user=7):
    """One user's requests at times ``cut_times``: each sees every event strictly before it."""
    full = random_history(rng, SCHEMA, counts)
    return [collate_rows([Row(user, int(t), history_before(full, t), random_cands(rng, n_cands), request_id=i)],
                         max_len=max_len) for i, t in enumerate(cut_times)]


def expected_statuses(batches) -> list[str]:
    """What the cache must say for a sequence of one user's requests without truncation."""
    out, prev = [], None
    for b in batches:
        n = sum(int(b.seq_ts[k].lengths().sum()) for k in SCHEMA.sequences)
        out.append("miss" if prev is None else "hit" if n == prev else "append")
        prev = n
    return out


@pytest.mark.parametrize("pyramid", ["none", "linear", "explicit"])
def test_cross_request_appends_are_exact_and_counted(pyramid):
    model = make_model(3, PYRAMIDS[pyramid], max_s=16)
    rng = np.random.default_rng(1)
    # events at t0 + cumulative gaps in [0, 500): ties inside and across kinds; cut times grow, some
    # requests see nothing new (hit), some one event, some several of both kinds; windows slide (L > 10, > 4)
    counts = {"click": 10, "like": 6}
    full_ts = sorted(e[3] for v in random_history(np.random.default_rng(1), SCHEMA, counts).values() for e in v)
    cuts = [full_ts[0], full_ts[0] + 1, full_ts[1] + 1, full_ts[1] + 1, full_ts[4] + 1, full_ts[9] + 1,
            full_ts[10] + 1, full_ts[-1] + 1]
    batches = user_requests(rng, counts, cuts)
    cache = UserKVCache(1 << 20)
    scorer = CachedScorer(model, cache, candidate_chunk=2)
    for batch in batches:
        torch.testing.assert_close(scorer.score_batch(batch), reference(model, batch), rtol=1e-5, atol=1e-5)
    want = expected_statuses(batches)
    s = cache.stats
    assert want[0] == "miss" and want[1] == "append" and want[3] == "hit"  # empty -> first event; equal
    assert (s.lookups, s.misses, s.hits, s.partial_hits) == (
        len(want), want.count("miss"), want.count("hit"), want.count("append"))
    last = sum(int(batches[-1].seq_ts[k].lengths().sum()) for k in SCHEMA.sequences)
    assert s.computed_tokens == last  # every event was run through the layers exactly once
    assert s.entries == 1 and s.bytes == cache.peek(7).nbytes and s.evictions == 0
    assert cache.peek(7).events.base is None  # owns its rows: the byte count is what it keeps alive


def test_truncation_is_a_miss_and_exact():
    """Loader keeps the last max_len events per kind: once the oldest one drops, every position moves."""
    model = make_model(2, PYRAMIDS["none"], max_s=16)
    rng = np.random.default_rng(2)
    full = {"click": [(i + 1, 1, 1, 100 * (i + 1)) for i in range(5)], "like": [(9, 2, 2, 450)]}
    seq = [301, 401, 451, 501, 502]  # clicks 3, 4, 4 + like, 5 -> last 4 (oldest dropped) + like, equal
    cache = UserKVCache(1 << 20)
    scorer = CachedScorer(model, cache)
    batches = [collate_rows([Row(7, t, history_before(full, t), random_cands(rng, 2))], max_len=4) for t in seq]
    for batch in batches:
        torch.testing.assert_close(scorer.score_batch(batch), reference(model, batch), rtol=1e-5, atol=1e-5)
    s = cache.stats
    assert [int(b.seq_ts["click"].lengths()[0]) for b in batches] == [3, 4, 4, 4, 4]
    assert (s.misses, s.partial_hits, s.hits) == (2, 2, 1)  # miss, append, append, miss (truncated), hit


def test_intent_grouped_append_is_a_miss():
    """With [SEP] tokens after each kind, new events land before a cached SEP: only equal histories hit."""
    model = make_model(2, PYRAMIDS["none"], max_s=16, seq_merge="intent_grouped")
    rng = np.random.default_rng(3)
    cache = UserKVCache(1 << 20)
    scorer = CachedScorer(model, cache)
    full = {"click": [(i + 1, 1, 1, 100 * (i + 1)) for i in range(3)], "like": []}
    for t in (201, 301, 302):
        batch = collate_rows([Row(7, t, history_before(full, t), random_cands(rng, 2))])
        torch.testing.assert_close(scorer.score_batch(batch), reference(model, batch), rtol=1e-5, atol=1e-5)
    assert (cache.stats.misses, cache.stats.partial_hits, cache.stats.hits) == (2, 0, 1)


def test_same_user_twice_in_one_batch_and_other_users():
    model = make_model(3, PYRAMIDS["linear"], max_s=16)
    rng = np.random.default_rng(4)
    full = {"click": [(i + 1, 1, 1, 100 * (i + 1)) for i in range(8)], "like": [(3, 2, 1, 250), (4, 2, 1, 750)]}
    other = random_history(rng, SCHEMA, {"click": 3})
    rows = [Row(1, 501, history_before(full, 501), random_cands(rng, 4), request_id=0),
            Row(2, 10**7, other, random_cands(rng, 2), request_id=1),
            Row(1, 10**7, history_before(full, 10**7), random_cands(rng, 3), request_id=2),
            Row(3, 10**7, {}, random_cands(rng, 1), request_id=3),
            Row(1, 10**7 + 1, history_before(full, 10**7), random_cands(rng, 5), request_id=4)]
    batch = collate_rows(rows)
    cache = UserKVCache(1 << 20)
    out = CachedScorer(model, cache, candidate_chunk=4).score_batch(batch)
    torch.testing.assert_close(out, reference(model, batch), rtol=1e-5, atol=1e-5)
    assert occurrence_waves([1, 2, 1, 3, 1]) == [[0, 1, 3], [2], [4]]
    assert (cache.stats.misses, cache.stats.partial_hits, cache.stats.hits) == (3, 1, 1)


def test_no_cache_and_tiny_cache_still_exact():
    model = make_model(2, PYRAMIDS["linear"], max_s=16)
    rng = np.random.default_rng(5)
    batches = user_requests(rng, {"click": 4}, [10**6, 10**6, 10**6])
    for cache in (None, UserKVCache(0), UserKVCache(100)):
        scorer = CachedScorer(model, cache)
        for b in batches:
            torch.testing.assert_close(scorer.score_batch(b), reference(model, b), rtol=1e-5, atol=1e-5)
        if cache is not None:
            assert len(cache) == 0 and cache.stats.rejected == 3 and cache.stats.misses == 3


def test_stage_two_memory_is_bounded_by_the_chunk(monkeypatch):
    """10k candidates: every stage-2 call sees <= candidate_chunk candidates and the *same* prefix tensors
    (attended in place, never copied per candidate or per chunk)."""
    model = make_model(2, PYRAMIDS["linear"], max_s=16)
    batch = random_request_batch(SCHEMA, [(6, 2), (1, 0)], [10_000, 3], seed=9)
    seen = []
    real = model.score_candidates

    def spy(prefix, ns_tokens, cand_offsets):
        seen.append((ns_tokens.shape[0], [k.data_ptr() for k in prefix.keys]))
        return real(prefix, ns_tokens, cand_offsets)

    monkeypatch.setattr(model, "score_candidates", spy)
    with torch.no_grad():
        out = CachedScorer(model, None, candidate_chunk=1024).score_batch(batch)
    assert out.shape == (10_003, 2) and torch.isfinite(out).all()
    assert len(seen) == 10 and max(n for n, _ in seen) <= 1024
    assert len({tuple(p) for _, p in seen}) == 1
    # spot-check a few candidates against the per-candidate reference
    with torch.no_grad():
        tok = model.tokenizer(batch)
        idx = torch.tensor([0, 4321, 9999, 10_001])
        sub = type(tok)(tok.s_tokens, tok.s_offsets, tok.ns_tokens[idx], torch.tensor([0, 3, 4]))
        torch.testing.assert_close(out[idx], real.__self__.rank_per_candidate(sub), rtol=1e-5, atol=1e-5)


def test_ranks_and_top_k_break_ties_by_item_id():
    from recsys.serving.ranking import target_ranks
    from recsys.serving.ranking import top_k_positions as top_k

    scores = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.9])
    assert top_k(scores, 3).tolist() == [1, 4, 0]
    assert target_ranks(scores, torch.tensor([0, 2, 4, 3])).tolist() == [2, 3, 1, 4]
