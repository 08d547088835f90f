"""OneTrans ranker: cached (shared-prefix) == per-candidate reference, masking, mixed params, pyramid."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from recsys.data.jagged import keep_last
from recsys.model.config import ModelConfig, PyramidConfig
from recsys.model.pyramid import UNBOUNDED, PyramidSchedule, flops_report
from recsys.model.ranker import OneTransRanker
from recsys.testing import random_request_batch, tiny_schema

SCHEMA = tiny_schema()


def make_model(n_layers: int = 2, pyramid: PyramidConfig | None = None, backend: str = "torch",
               max_s: int = 24, **kw) -> OneTransRanker:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=n_layers, ffn_mult=2, n_ns_tokens=3, emb_dim=8,
                      head_hidden=16, pyramid=pyramid or PyramidConfig(mode="none"), attention_backend=backend, **kw)
    return OneTransRanker(SCHEMA, cfg, max_s_tokens=max_s)


def tokens(model: OneTransRanker, hist, cands, seed: int = 0):
    with torch.no_grad():
        return model.tokenizer(random_request_batch(SCHEMA, hist, cands, seed=seed))


PYRAMIDS = {
    "none": PyramidConfig(mode="none"),
    "linear": PyramidConfig(mode="linear", final=0, round_to=4),
    "linear_final3": PyramidConfig(mode="linear", final=3, round_to=1),
}


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("pyramid", sorted(PYRAMIDS))
@pytest.mark.parametrize("hist,cands", [
    ([(0, 0)], [1]),                          # empty history, one candidate
    ([(1, 0), (0, 2), (5, 7)], [1, 7, 2]),    # length 1, 2 and 12 histories
    ([(11, 6), (0, 0)], [7, 1]),              # mixed long / empty
])
def test_cached_equals_per_candidate(backend, n_layers, pyramid, hist, cands):
    model = make_model(n_layers, PYRAMIDS[pyramid], backend)
    tok = tokens(model, hist, cands)
    with torch.no_grad():
        fast = model.rank(tok)
        slow = model.rank_per_candidate(tok)
    assert fast.shape == (sum(cands), len(SCHEMA.tasks))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_cached_equals_per_candidate_fp32_many_candidates():
    model = make_model(2, PYRAMIDS["linear"], "torch")
    batch = random_request_batch(SCHEMA, [(9, 4), (0, 0), (3, 1)], [300, 5, 1], seed=3)
    with torch.no_grad():
        tok = model.tokenizer(batch)
        torch.testing.assert_close(model.rank(tok), model.rank_per_candidate(tok), rtol=1e-5, atol=1e-5)


def test_backends_agree_and_gradients_flow():
    ref, fast = make_model(backend="reference"), make_model(backend="torch")
    fast.load_state_dict(ref.state_dict())
    batch = random_request_batch(SCHEMA, [(4, 3), (0, 1)], [3, 2], seed=1)
    out_ref, out_fast = ref(batch), fast(batch)
    torch.testing.assert_close(out_fast, out_ref.to(out_fast.dtype), rtol=1e-5, atol=1e-5)
    out_fast.sum().backward()
    top = f"blocks.{len(fast.blocks) - 1}."
    # The top block's S-output path (s_out, s_norm2, s_ffn) feeds nothing: only NS tokens reach
    # the heads, so the fast path skips it and those parameters get no gradient.
    dead = {n for n, _ in fast.named_parameters() if n.startswith(top + "s_") and not n.startswith(top + "s_qkv")
            and not n.startswith(top + "s_norm1")}
    for name, p in fast.named_parameters():
        if name in dead:
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_causal_mask_by_perturbation():
    """On the full-sequence path: S tokens never see NS tokens or later S tokens; NS token i
    never sees NS tokens > i; candidates never see each other."""
    model = make_model(3, PYRAMIDS["none"], "reference")
    tok = tokens(model, [(4, 3)], [2])
    s0, so, ns0 = model.rank_per_candidate(tok, return_tokens=True)
    # 1) perturb the last NS token of candidate 0
    ns = tok.ns_tokens.clone()
    ns[0, -1] += 3.0
    s1, _, ns1 = model.rank_per_candidate(dataclasses.replace(tok, ns_tokens=ns), return_tokens=True)
    torch.testing.assert_close(s1, s0, rtol=0, atol=0)                # S never sees NS
    torch.testing.assert_close(ns1[0, :-1], ns0[0, :-1], rtol=0, atol=0)  # earlier NS unaffected
    torch.testing.assert_close(ns1[1], ns0[1], rtol=0, atol=0)         # other candidate unaffected
    assert not torch.allclose(ns1[0, -1], ns0[0, -1])
    # 2) perturb S token j=4 (of 7): S outputs at positions < 4 unchanged, >= 4 changed
    s = tok.s_tokens.clone()
    s[4] += 3.0
    s2, _, ns2 = model.rank_per_candidate(dataclasses.replace(tok, s_tokens=s), return_tokens=True)
    n_s = 7
    for c in range(2):
        rows = slice(int(so[c]), int(so[c]) + n_s)
        torch.testing.assert_close(s2[rows][:4], s0[rows][:4], rtol=0, atol=0)
        assert not torch.allclose(s2[rows][4:], s0[rows][4:])
    assert not torch.allclose(ns2, ns0)  # NS tokens do see every S token


def test_mixed_parameterization():
    model = make_model(1)
    blk = model.blocks[0]
    n = model.tokenizer.n_ns
    for w in (blk.ns_qkv.weight, blk.ns_out.weight, blk.ns_ffn1.weight, blk.ns_ffn2.weight):
        assert w.shape[0] == n
        for i in range(n):
            for j in range(i + 1, n):
                assert not torch.equal(w[i], w[j]), "NS positions must own distinct parameters"
    # S tokens: one shared projection (no per-position axis)
    assert blk.s_qkv.weight.shape == (3 * 16, 16)
    # Swapping two NS tokens' inputs changes the result (position-specific weights), whereas
    # each S token is transformed by the same weights regardless of its slot.
    tok = tokens(model, [(3, 2)], [1])
    out = model.rank(tok)
    swapped = dataclasses.replace(tok, ns_tokens=tok.ns_tokens[:, [1, 0, 2]])
    assert not torch.allclose(model.rank(swapped), out)
    pos = torch.arange(5)
    q0, k0, v0 = blk.s_project(tok.s_tokens, pos, pos)
    q1, k1, v1 = blk.s_project(tok.s_tokens.flip(0), pos, pos.flip(0))
    torch.testing.assert_close(k1, k0.flip(0))
    with pytest.raises(ValueError, match="rotary"):
        blk.s_project(tok.s_tokens, pos)


def test_pyramid_keeping_everything_equals_no_pyramid():
    none = make_model(3, PyramidConfig(mode="none"))
    keep_all = make_model(3, PyramidConfig(mode="explicit", queries=[50, 50, 50]))
    top_only_ns = make_model(3, PyramidConfig(mode="explicit", queries=[50, 50, 0]))
    tok = tokens(none, [(6, 5), (0, 2), (1, 0)], [2, 3, 1])
    ref = none.rank(tok)
    torch.testing.assert_close(keep_all.rank(tok), ref, rtol=1e-6, atol=1e-6)
    # The top layer's S outputs feed nothing, so dropping all its S queries is exact too.
    torch.testing.assert_close(top_only_ns.rank(tok), ref, rtol=1e-6, atol=1e-6)
    # A pyramid that really prunes changes the function (deeper layers see fewer S tokens).
    pruned = make_model(3, PyramidConfig(mode="explicit", queries=[50, 2, 0]))
    assert not torch.allclose(pruned.rank(tok), ref)


def test_pyramid_schedule_linear_and_flops():
    sched = PyramidSchedule.from_config(PyramidConfig(mode="linear", final=0, round_to=32), 6, 1190)
    assert sched.queries[0] == UNBOUNDED and sched.queries[-1] == 0
    assert all(q % 32 == 0 for q in sched.queries[1:-1])
    assert list(sched.queries[1:]) == sorted(sched.queries[1:], reverse=True)
    assert sched.lengths(100)[0] == 100 and sched.lengths(100)[-1] == 0
    assert PyramidSchedule((UNBOUNDED,) * 3).budget(2) == 0  # top layer: NS queries only
    rows = flops_report(sched, 1190, n_ns=8, n_cand=1, d=256, ffn=1024)
    assert rows[0]["flops_pyramid"] == pytest.approx(rows[0]["flops_no_pyramid"])
    assert sum(r["flops_pyramid"] for r in rows) < 0.75 * sum(r["flops_no_pyramid"] for r in rows)
    with pytest.raises(ValueError, match="non-increasing"):
        PyramidSchedule((4, 8))


def test_keep_last():
    offsets = torch.tensor([0, 5, 5, 7])
    rows, off = keep_last(offsets, 3)
    assert rows.tolist() == [2, 3, 4, 5, 6] and off.tolist() == [0, 3, 3, 5]


@pytest.mark.parametrize("merge", ["time_interleaved", "intent_grouped"])
@pytest.mark.parametrize("ns", ["auto_split", "group_wise"])
def test_tokenizer_shapes(merge, ns):
    model = make_model(2, seq_merge=merge, ns_tokenizer=ns, ns_recent_events=3)
    batch = random_request_batch(SCHEMA, [(3, 2), (0, 0), (1, 4)], [2, 1, 3])
    tok = model.tokenizer(batch)
    extra = len(SCHEMA.sequences) if merge == "intent_grouped" else 0
    assert (tok.s_offsets[1:] - tok.s_offsets[:-1]).tolist() == [5 + extra, 0 + extra, 5 + extra]
    assert tok.ns_tokens.shape == (6, model.tokenizer.n_ns, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.rank(tok), model.rank_per_candidate(tok), rtol=1e-5, atol=1e-5)


def test_time_interleaved_merge_orders_by_time():
    model = make_model(1)
    tok = model.tokenizer
    d = 16
    a = torch.arange(3, dtype=torch.float32)[:, None].expand(3, d)       # kind 0 tokens 0,1,2
    b = 10 + torch.arange(2, dtype=torch.float32)[:, None].expand(2, d)  # kind 1 tokens 10, 11
    vals, lens = tok._merge([a, b], [torch.tensor([2, 1]), torch.tensor([1, 1])],
                            [torch.tensor([5, 9, 1]), torch.tensor([7, 0])])
    got = (vals - torch.cat([tok.kind_emb[0].expand(3, d), tok.kind_emb[1].expand(2, d)])[[0, 2, 1, 4, 3]])
    assert lens.tolist() == [3, 2]
    assert got[:, 0].round().tolist() == [0.0, 10.0, 1.0, 11.0, 2.0]  # req0: t5,t7,t9  req1: t0,t1


def test_s_tokens_do_not_depend_on_request_time():
    """What makes cross-request KV caching exact: S tokens are a function of the events only."""
    model = make_model(1)
    batch = random_request_batch(SCHEMA, [(4, 2), (0, 3)], [2, 1], seed=5)
    later = dataclasses.replace(batch, request_ts=batch.request_ts + 86_400 * 30)
    with torch.no_grad():
        a, b = model.tokenizer(batch), model.tokenizer(later)
    torch.testing.assert_close(b.s_tokens, a.s_tokens, rtol=0, atol=0)
    assert not torch.allclose(b.ns_tokens, a.ns_tokens)  # recency lives on the NS side


def test_previous_event_gap_bucket():
    from recsys.data.id_features import previous_event_gap_bucket

    ts = torch.tensor([10, 11, 14, 100, 5, 6])
    out = previous_event_gap_bucket(ts, torch.tensor([3, 0, 1, 2]), buckets=32)
    # request 0: first event -> 0, gaps 1 and 3; request 2: single event -> 0; request 3: first -> 0, gap 1
    assert out.tolist() == [0, 2, 3, 0, 0, 2]


def test_recent_event_slots():
    """Slot r of kind k holds the r-th most recent event of that kind (zeros past its length)."""
    model = make_model(1, ns_recent_events=5)
    tok = model.tokenizer
    batch = random_request_batch(SCHEMA, [(7, 1), (0, 2)], [1, 1], seed=2)
    emb = tok.embeddings.sequence(batch.id_features)
    with torch.no_grad():
        got = tok._recent_events(emb, 2, batch.sizes).view(2, len(SCHEMA.sequences), tok.recent, -1)
    click = emb["click.item_id"].values() + emb["click.category"].values()  # request 0: rows 0..6
    for r in range(tok.recent):
        torch.testing.assert_close(got[0, 0, r], click[6 - r])
    assert torch.count_nonzero(got[1, 0]) == 0  # empty click history
    like = emb["like.item_id"].values() + emb["like.category"].values()  # request 0: row 0, request 1: rows 1-2
    torch.testing.assert_close(got[1, 1, 0], like[2])
    torch.testing.assert_close(got[1, 1, 1], like[1])
    assert torch.count_nonzero(got[1, 1, 2:]) == 0


def test_rotary_scores_depend_on_relative_position_only():
    from recsys.model.block import rotary

    q, k = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    def score(i, j):
        return (rotary(q, torch.tensor([i])) * rotary(k, torch.tensor([j]))).sum(-1)
    torch.testing.assert_close(score(7, 3), score(104, 100), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(7, 3), score(7, 5))


@pytest.mark.parametrize("rope", [True, False])
def test_cached_equals_per_candidate_with_and_without_rope(rope):
    model = make_model(3, PYRAMIDS["linear"], "torch", rope=rope)
    tok = tokens(model, [(9, 4), (0, 0), (1, 2)], [3, 2, 5])
    with torch.no_grad():
        torch.testing.assert_close(model.rank(tok), model.rank_per_candidate(tok), rtol=1e-5, atol=1e-5)
