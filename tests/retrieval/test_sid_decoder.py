"""SID decoder over the ranker's cached prefix: cached decoding == a from-scratch re-run, shared-prefix
beams == each beam alone with its prefix copied, teacher forcing == the step-by-step log-probs, beam
search with the decoder == brute force over the catalog where certified, refusals."""

from __future__ import annotations

import itertools

import pytest
import torch

from recsys.data.jagged import lengths_to_offsets
from recsys.errors import InputError
from recsys.model.config import ModelConfig, PyramidConfig
from recsys.model.ranker import OneTransRanker, PrefixKV
from recsys.quant.artifact import SemanticIds
from recsys.quant.collisions import resolve_collisions
from recsys.quant.rq_kmeans import RQKMeans
from recsys.retrieval.beam import constrained_beam_search
from recsys.retrieval.sid_decoder import SidDecoder, sid_nll, user_prefix
from recsys.retrieval.sid_search import CachedStepper, sid_beam_search
from recsys.retrieval.sid_trie import SidTrie
from recsys.serving.cache import UserKVCache
from recsys.serving.scorer import CachedScorer
from recsys.serving.state import states_to_prefix
from recsys.testing import random_request_batch, tiny_schema, torch_threads

SCHEMA = tiny_schema()
PYRAMIDS = {"none": PyramidConfig(mode="none"), "linear_final0": PyramidConfig(mode="linear", final=0, round_to=1)}
HIST = [(3, 2), (0, 0), (5, 7), (1, 0), (0, 0)]  # requests 1 and 4: empty histories
LEVELS, VOCAB = 3, 4


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def make(pyramid: str = "none", rope: bool = True, n_layers: int = 3, grad: bool = False, vocab: int = VOCAB
         ) -> tuple[OneTransRanker, SidDecoder, PrefixKV]:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=n_layers, ffn_mult=2, n_ns_tokens=3, emb_dim=8,
                      head_hidden=16, pyramid=PYRAMIDS[pyramid], attention_backend="torch", rope=rope)
    ranker = OneTransRanker(SCHEMA, cfg, max_s_tokens=24)
    dec = SidDecoder(cfg, LEVELS, vocab)
    batch = random_request_batch(SCHEMA, HIST, [1] * len(HIST), seed=1)
    with torch.set_grad_enabled(grad):
        prefix = user_prefix(ranker, batch)
    return ranker, dec, prefix


def parents_within_requests(cand_offsets: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random parent (with repeats, as beam search re-selects) of every row, inside its own request."""
    out = []
    for a, b in zip(cand_offsets[:-1].tolist(), cand_offsets[1:].tolist()):
        out.append(torch.randint(a, b, (b - a,), generator=g) if b > a else torch.zeros(0, dtype=torch.int64))
    return torch.cat(out)


@pytest.mark.parametrize("pyramid,rope", [("none", True), ("linear_final0", True), ("none", False)])
def test_cached_decoding_equals_full_rerun(pyramid, rope):
    _, dec, prefix = make(pyramid, rope)
    g = torch.Generator().manual_seed(3)
    cand_offsets = lengths_to_offsets(torch.tensor([2, 3, 1, 2, 2]))
    c = int(cand_offsets[-1])
    codes = torch.randint(0, VOCAB, (c, LEVELS), generator=g)
    codes[8:10] = codes[2]  # rows 8, 9 (request 4, no history) feed the codes of row 2 (request 1, no history)
    state = dec.begin(prefix, cand_offsets)
    with torch.no_grad():
        for t in range(LEVELS):
            logp, state = dec.step(state, None if t == 0 else codes[:, t - 1])
            full = dec(prefix, codes[:, :t], cand_offsets)  # [C, t + 1, V], every token from scratch
            assert logp.shape == (c, VOCAB)
            torch.testing.assert_close(logp, full[:, t], rtol=1e-5, atol=1e-5)
            assert torch.allclose(logp.exp().sum(1), torch.ones(c), atol=1e-5)
            # Empty history: start token + codes only, the same prior for every such user ...
            torch.testing.assert_close(logp[8], logp[2], rtol=0, atol=1e-6)
            torch.testing.assert_close(logp[9], logp[2], rtol=0, atol=1e-6)
            if t == 0:  # ... while a history matters (rows 0 and 2 both see only the start token)
                assert not torch.allclose(logp[0], logp[2], atol=1e-3)
            # Beam re-selection: rows continue random parents of their request, then diverge
            # (row 2 continues itself and rows 8, 9 row 8, so those three keep equal codes).
            parent = parents_within_requests(cand_offsets, g)
            parent[2], parent[8:10] = 2, 8
            state = state.select(parent)
            codes = torch.cat([codes[parent, :t], torch.randint(0, VOCAB, (c, LEVELS - t), generator=g)], 1)
            codes[8:10, t:] = codes[2, t:]


def alone(prefix: PrefixKV, b: int) -> PrefixKV:
    """Request ``b``'s prefix alone (a copy), as a one-request batch."""
    ks, vs, offs = [], [], []
    for k, v, o in zip(prefix.keys, prefix.values, prefix.offsets):
        a, e = int(o[b]), int(o[b + 1])
        ks.append(k[a:e].clone())
        vs.append(v[a:e].clone())
        offs.append(torch.tensor([0, e - a]))
    return PrefixKV(ks, vs, offs)


@pytest.mark.parametrize("pyramid", sorted(PYRAMIDS))
def test_beams_sharing_the_prefix_equal_each_beam_alone(pyramid):
    _, dec, prefix = make(pyramid)
    counts = [3, 2, 1, 4, 2]
    cand_offsets = lengths_to_offsets(torch.tensor(counts))
    codes = torch.randint(0, VOCAB, (int(cand_offsets[-1]), LEVELS - 1), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        shared = dec(prefix, codes, cand_offsets)  # [C, L, V]
        dec.backend = "reference"  # the oracle: one loop, prefix concatenated per candidate
        owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        each = torch.cat([dec(alone(prefix, int(owner[i])), codes[i:i + 1], torch.tensor([0, 1]))
                          for i in range(codes.shape[0])])
    torch.testing.assert_close(shared, each, rtol=1e-5, atol=1e-5)


def test_teacher_forcing_equals_step_by_step_logprobs_and_trains_both():
    ranker, dec, prefix = make("linear_final0", grad=True)
    r = len(HIST)
    targets = torch.randint(0, VOCAB, (r, LEVELS), generator=torch.Generator().manual_seed(5))
    loss = sid_nll(dec, prefix, targets)
    with torch.no_grad():
        state, total = dec.begin(prefix, torch.arange(r + 1)), torch.zeros(r)
        for t in range(LEVELS):
            logp, state = dec.step(state, None if t == 0 else targets[:, t - 1])
            total += logp.gather(1, targets[:, t:t + 1]).squeeze(1)
    torch.testing.assert_close(loss.detach(), -total.mean(), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert dec.code_emb.grad.abs().sum() > 0 and dec.head_w.grad.abs().sum() > 0
    assert ranker.blocks[0].s_qkv.weight.grad.abs().sum() > 0  # the prefix is trained through
    assert ranker.tokenizer.embeddings.seq_tables.embeddings["item_id_table"].weight.grad is not None


@pytest.mark.parametrize("pyramid", sorted(PYRAMIDS))
def test_the_serving_cache_prefix_feeds_the_decoder(pyramid):
    """The per-user states the ranker's serving cache holds are the decoder's prefix: same log-probs."""
    ranker, dec, prefix = make(pyramid)
    batch = random_request_batch(SCHEMA, HIST, [1] * len(HIST), seed=1)
    scorer = CachedScorer(ranker, UserKVCache(1 << 24))
    with torch.no_grad():
        scorer.user_states(batch, ranker.tokenizer(batch))  # fill the cache
        cached = states_to_prefix(scorer.user_states(batch, ranker.tokenizer(batch)))
        assert scorer.cache.stats.hits == len(HIST)
        codes = torch.randint(0, VOCAB, (len(HIST), LEVELS - 1), generator=torch.Generator().manual_seed(6))
        offs = torch.arange(len(HIST) + 1)
        torch.testing.assert_close(dec(cached, codes, offs), dec(prefix, codes, offs), rtol=1e-5, atol=1e-5)


def catalog(n: int, seed: int) -> torch.Tensor:
    """``SemanticIds.codes``-like ``[2n + 1, L]``: ``n`` random distinct SIDs at random rows, the rest -1."""
    g = torch.Generator().manual_seed(seed)
    every = list(itertools.product(range(VOCAB), repeat=LEVELS))
    sids = torch.tensor([every[i] for i in torch.randperm(len(every), generator=g)[:n].tolist()])
    codes = torch.full((2 * n + 1, LEVELS), -1, dtype=torch.int64)
    codes[torch.randperm(2 * n, generator=g)[:n] + 1] = sids
    return codes


def brute_force(dec: SidDecoder, prefix: PrefixKV, trie: SidTrie) -> tuple[torch.Tensor, torch.Tensor]:
    """Every request x every catalog SID, teacher-forced: (scores ``[R, N]``, item ids ``[N]``)."""
    r, sids = prefix.offsets[0].numel() - 1, trie.sorted_codes
    n = sids.shape[0]
    codes = sids.repeat(r, 1)
    with torch.no_grad():
        logp = dec(prefix, codes[:, :-1], torch.arange(r + 1) * n)  # [R*N, L, V]
    return logp.gather(2, codes.unsqueeze(2)).squeeze(2).sum(1).view(r, n), trie.leaf_item


def rq_kmeans_catalog() -> torch.Tensor:
    """A real artifact: RQ-KMeans (2 levels x 3 codes) on 40 vectors + the disambiguation level (L = 3)."""
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    codes, stats = resolve_collisions(RQKMeans(levels=2, codebook_size=3, iters=5, seed=0).fit(x))
    assert stats.collision_rate > 0 and codes.shape == (40, LEVELS)
    table = torch.cat([torch.full((1, LEVELS), -1), codes])  # item 0 = padding, no SID
    return SemanticIds(table, torch.tensor([3, 3]), torch.zeros(6), torch.ones(()), {}).codes


@pytest.mark.parametrize("name,n_items,w", [("random", 13, 1), ("random", 13, 3), ("random", 13, 13),
                                            ("random", 13, 16), ("random", 30, 30), ("rq_kmeans", 40, 5),
                                            ("rq_kmeans", 40, 40)])
def test_beam_search_with_decoder_equals_brute_force_where_certified(name, n_items, w):
    codes = catalog(n_items, seed=n_items) if name == "random" else rq_kmeans_catalog()
    trie = SidTrie(codes)
    _, dec, prefix = make("linear_final0", vocab=trie.vocab_size)
    assert len(trie) == n_items
    res = sid_beam_search(dec, prefix, trie, w)
    r = len(HIST)
    # The cache and its reorder hook == the same search with a decoder re-run from scratch each step.
    with torch.no_grad():
        scratch = constrained_beam_search(trie, lambda p: dec(prefix, p, torch.arange(r + 1) * w)[:, -1], r, w)
    assert torch.equal(res.item_ids, scratch.item_ids) and torch.equal(res.certified, scratch.certified)
    torch.testing.assert_close(res.scores, scratch.scores, rtol=1e-5, atol=1e-5)
    scores, items = brute_force(dec, prefix, trie)
    true_score = dict(zip(items.tolist(), scores.T))
    for q in range(r):
        got = res.item_ids[q][res.item_ids[q] >= 0]
        assert got.numel() == min(w, n_items) and len(set(got.tolist())) == got.numel()
        assert set(got.tolist()) <= set(items.tolist())  # catalog items only
        torch.testing.assert_close(res.scores[q, : got.numel()], torch.stack([true_score[int(i)][q] for i in got]),
                                   rtol=1e-5, atol=1e-5)
        top = scores[q].topk(min(w, n_items))
        if w >= max(trie.num_nodes):
            assert bool(res.certified[q])  # nothing dropped: exhaustive
        if res.certified[q]:
            assert torch.equal(got, items[top.indices])
            torch.testing.assert_close(res.scores[q, : got.numel()], top.values, rtol=1e-5, atol=1e-5)
    if w >= max(trie.num_nodes):
        assert res.certified.all()


def test_refusals_name_the_shapes():
    _, dec, prefix = make()
    r = len(HIST)
    ok = torch.zeros(r, LEVELS, dtype=torch.int64)
    with pytest.raises(InputError, match=r"\(5, 4\).*\[5, 3\]"):
        sid_nll(dec, prefix, torch.zeros(r, LEVELS + 1, dtype=torch.int64))
    with pytest.raises(InputError, match=r"\(4, 3\).*\[5, 3\]"):
        sid_nll(dec, prefix, ok[:4])
    for bad in (VOCAB, -1):
        with pytest.raises(InputError, match=r"\(5, 3\).*outside \[0, 4\)"):
            sid_nll(dec, prefix, ok.index_fill(0, torch.tensor([2]), bad))
    with pytest.raises(InputError, match="integer"):
        sid_nll(dec, prefix, ok.float())
    with pytest.raises(InputError, match="3 layers, the decoder 2"):
        sid_nll(make(n_layers=2)[1], prefix, ok)
    with pytest.raises(InputError, match="2 levels x 4 codes, the decoder 3 x 4"):
        sid_beam_search(dec, prefix, SidTrie(torch.tensor([[0, 1], [1, 2]]), vocab_size=VOCAB), 2)
    with pytest.raises(InputError, match="3 levels x 3 codes"):
        sid_beam_search(dec, prefix, SidTrie(torch.tensor([[0, 1, 2], [1, 2, 0]])), 2)
    with pytest.raises(InputError, match="another request"):
        dec.begin(prefix, torch.arange(r + 1)).select(torch.tensor([1, 0, 2, 3, 4]))
    trie = SidTrie(catalog(13, seed=13), vocab_size=VOCAB)
    stepper = CachedStepper(dec, prefix, 3)
    with pytest.raises(InputError, match="do not extend the cached ones"):  # beams re-selected, cache not told
        constrained_beam_search(trie, stepper, r, 3)


def test_a_few_teacher_forcing_steps_make_beam_search_retrieve_the_targets():
    """Training and decoding agree end to end: after fitting ``sid_nll`` on one batch, the constrained
    search's best item is each request's target. The two empty-history requests share one prior, so
    they get the same target."""
    _, dec, prefix = make("linear_final0")  # the ranker's prefix fixed: the decoder alone learns
    codes = catalog(13, seed=13)
    trie = SidTrie(codes, vocab_size=VOCAB)
    items = trie.leaf_item[torch.randperm(13, generator=torch.Generator().manual_seed(7))[:len(HIST)]]
    items[4] = items[1]
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    for _ in range(20):
        loss = sid_nll(dec, prefix, codes[items])
        opt.zero_grad()
        loss.backward()
        opt.step()
    res = sid_beam_search(dec, prefix, trie, 3)
    assert torch.equal(res.item_ids[:, 0], items)
