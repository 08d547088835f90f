"""SID trie masks == a set-of-tuples reference; constrained beam search == a loop reference of beam
search and, where it is provably exact (``certified``), == the top-W of a brute-force enumeration of
every catalog SID's summed log-probability."""

from __future__ import annotations

import itertools

import pytest
import torch

from recsys.errors import InputError
from recsys.quant.artifact import SemanticIds
from recsys.quant.collisions import resolve_collisions
from recsys.quant.rq_kmeans import RQKMeans
from recsys.retrieval.beam import constrained_beam_search
from recsys.retrieval.sid_trie import SidTrie


def artifact_codes(sids: list[tuple[int, ...]], seed: int) -> torch.Tensor:
    """Codes laid out as ``SemanticIds.codes``: row = item id, row 0 and a few other rows all -1."""
    g = torch.Generator().manual_seed(seed)
    n, depth = len(sids), len(sids[0])
    codes = torch.full((2 * n + 1, depth), -1, dtype=torch.int64)
    rows = torch.randperm(2 * n, generator=g)[:n] + 1
    codes[rows] = torch.tensor(sids)
    return codes


def random_catalog(cards: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    every = list(itertools.product(*[range(c) for c in cards]))
    pick = torch.randperm(len(every), generator=g)[:n].tolist()
    return artifact_codes([every[i] for i in pick], seed)


def rq_kmeans_catalog() -> torch.Tensor:
    """A real artifact: RQ-KMeans (2 levels x 3 codes) on 40 vectors, collisions resolved by the extra level."""
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    sem = RQKMeans(levels=2, codebook_size=3, iters=5, seed=0).fit(x)
    codes, stats = resolve_collisions(sem)
    assert stats.collision_rate > 0  # the catalog has colliding prefixes
    table = torch.cat([torch.full((1, 3), -1), codes])  # item 0 = padding, no SID
    sids = SemanticIds(table, torch.tensor([3, 3]), torch.zeros(6), torch.ones(()), {})
    return sids.codes


CATALOGS = {
    "docstring": artifact_codes([(0, 1), (0, 2), (1, 0)], 0),
    "random_3x4x2": random_catalog((3, 4, 2), 15, 1),
    "shared_prefix": artifact_codes([(0, a, b) for a in range(3) for b in range(4) if (a + b) % 3] + [(1, 0, 0)], 2),
    "wide_4x6": random_catalog((4, 6), 20, 3),
    "rq_kmeans": rq_kmeans_catalog(),
    "single_item": artifact_codes([(2, 0, 1)], 4),
}


def items_of(codes: torch.Tensor) -> dict[tuple[int, ...], int]:
    return {tuple(row): i for i, row in enumerate(codes.tolist()) if row[0] >= 0}


def next_codes_reference(items: dict[tuple[int, ...], int]) -> dict[tuple[int, ...], set[int]]:
    nxt: dict[tuple[int, ...], set[int]] = {}
    for sid in items:
        for t in range(len(sid)):
            nxt.setdefault(sid[:t], set()).add(sid[t])
    return nxt


@pytest.mark.parametrize("name", list(CATALOGS))
def test_trie_masks_match_set_reference(name):
    codes = CATALOGS[name]
    trie, items = SidTrie(codes), items_of(codes)
    nxt = next_codes_reference(items)
    assert len(trie) == len(items)
    for t in range(trie.depth):
        real = [p for p in nxt if len(p) == t]
        fake = [p for p in itertools.product(range(trie.vocab_size), repeat=t) if p not in nxt][:10]
        prefixes = torch.tensor(real + fake, dtype=torch.int64).reshape(len(real) + len(fake), t)
        mask = trie.valid_next_codes(prefixes)
        want = torch.zeros_like(mask)
        for i, p in enumerate(real):
            want[i, sorted(nxt[p])] = True
        assert torch.equal(mask, want), f"level {t}"
        assert (trie.node_of_prefix(prefixes)[len(real):] == -1).all()
    full = torch.tensor(list(items))
    assert torch.equal(trie.leaf_item[trie.node_of_prefix(full)], torch.tensor(list(items.values())))


def test_trie_refusals():
    with pytest.raises(InputError, match="share the SID"):
        SidTrie(torch.tensor([[0, 1], [1, 1], [0, 1]]))
    with pytest.raises(InputError, match="mixes -1"):
        SidTrie(torch.tensor([[0, 1], [-1, 1]]))
    with pytest.raises(InputError, match="empty"):
        SidTrie(torch.full((3, 2), -1))
    with pytest.raises(InputError, match="vocab_size=2"):
        SidTrie(torch.tensor([[0, 2]]), vocab_size=2)
    with pytest.raises(InputError, match="t < 2"):
        SidTrie(torch.tensor([[0, 1]])).valid_next_codes(torch.tensor([[0, 1]]))


class TableDecoder:
    """A fixed random log-softmax table per (request, prefix): the brute force over it is exact.
    Fails if the search hands it a prefix that no catalog item has."""

    def __init__(self, items, num_requests, vocab, beam_width, seed, scale=2.0, normalised=True):
        g = torch.Generator().manual_seed(seed)
        prefixes = sorted(next_codes_reference(items))
        self.table = []
        for _ in range(num_requests):
            logits = torch.randn(len(prefixes), vocab, generator=g) * scale
            rows = torch.log_softmax(logits, 1) if normalised else logits
            self.table.append(dict(zip(prefixes, rows)))
        self.w, self.calls = beam_width, 0

    def __call__(self, prefix_codes: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = []
        for row, p in enumerate(prefix_codes.tolist()):
            assert tuple(p) in self.table[row // self.w], f"decoder got a non-catalog prefix {p}"
            out.append(self.table[row // self.w][tuple(p)])
        return torch.stack(out)

    def score(self, r: int, sid: tuple[int, ...]) -> float:
        return sum(float(self.table[r][sid[:t]][sid[t]]) for t in range(len(sid)))


def brute_force(dec: TableDecoder, r: int, items, w: int) -> list[tuple[int, float]]:
    ranked = sorted(((items[s], dec.score(r, s)) for s in items), key=lambda x: -x[1])
    return ranked[:w]


def loop_beam_reference(dec: TableDecoder, r: int, items, w: int, depth: int) -> list[tuple[int, float]]:
    """Beam search written the obvious way: extend every kept beam by every allowed code, sort, keep w."""
    nxt = next_codes_reference(items)
    beams: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
    for _ in range(depth):
        cands = [(p + (c,), s + float(dec.table[r][p][c])) for p, s in beams for c in sorted(nxt[p])]
        beams = sorted(cands, key=lambda x: -x[1])[:w]
    return [(items[p], s) for p, s in beams]


def check_result(res, dec, items, trie, r, w):
    got = [(int(i), float(s)) for i, s in zip(res.item_ids[r], res.scores[r]) if i >= 0]
    ids = [i for i, _ in got]
    assert len(set(ids)) == len(ids) and all(i in items.values() for i in ids)
    assert len(got) == min(w, len(items))
    assert (res.item_ids[r, len(got):] == -1).all() and torch.isinf(res.scores[r, len(got):]).all()
    sid_of = {i: s for s, i in items.items()}
    for j, (i, s) in enumerate(got):
        assert tuple(res.codes[r, j].tolist()) == sid_of[i]
        assert abs(dec.score(r, sid_of[i]) - s) < 1e-4
    return got


def assert_same(got, want):
    assert [i for i, _ in got] == [i for i, _ in want]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(got, want))


@pytest.mark.parametrize("name", list(CATALOGS))
@pytest.mark.parametrize("w", [1, 5, 50])
@pytest.mark.parametrize("scale", [2.0, 8.0])
def test_beam_search_matches_references(name, w, scale):
    codes = CATALOGS[name]
    trie, items = SidTrie(codes), items_of(codes)
    num_requests = 3
    dec = TableDecoder(items, num_requests, trie.vocab_size, w, seed=w + len(items), scale=scale)
    res = constrained_beam_search(trie, dec, num_requests, w)
    assert res.item_ids.shape == res.scores.shape == (num_requests, w) and dec.calls == trie.depth
    wide = w >= max(trie.num_nodes)  # nothing is ever dropped: exhaustive
    for r in range(num_requests):
        got = check_result(res, dec, items, trie, r, w)
        assert_same(got, loop_beam_reference(dec, r, items, w, trie.depth))
        exact = brute_force(dec, r, items, w)
        # Beam search never beats the truth rank by rank; where certified it is the truth.
        assert all(a <= b + 1e-4 for (_, a), (_, b) in zip(got, exact))
        if res.certified[r] or wide:
            assert bool(res.certified[r])
            assert_same(got, exact)
    if scale == 8.0 and len(items) > 1:
        assert res.certified.any()  # peaked tables: the exact path is exercised, not only the bound


def test_beam_width_one_can_miss_the_best_item_and_says_so():
    """Prefix (0,) looks best (log p = -0.1) but every item under it is poor; beam width 1 returns one of
    them, the best item (1, 0) is lost, and the result is not certified. Width 2 finds and certifies it."""
    codes = torch.tensor([[-1, -1], [0, 0], [0, 1], [1, 0]])
    trie = SidTrie(codes)
    lp = {(): torch.tensor([-0.1, -2.4]), (0,): torch.tensor([-5.0, -5.0]), (1,): torch.tensor([-0.01, -9.0])}

    def step(prefix_codes):
        return torch.stack([lp[tuple(p)] for p in prefix_codes.tolist()])

    narrow = constrained_beam_search(trie, step, 1, 1)
    assert narrow.item_ids[0, 0] in (1, 2) and not narrow.certified[0]
    wide = constrained_beam_search(trie, step, 1, 2)
    assert wide.item_ids[0].tolist() == [3, 1] or wide.item_ids[0].tolist() == [3, 2]
    assert wide.certified[0]


def test_impossible_codes_and_unnormalised_decoders():
    codes = CATALOGS["random_3x4x2"]
    trie, items = SidTrie(codes), items_of(codes)
    dec = TableDecoder(items, 2, trie.vocab_size, 4, seed=9, normalised=False)
    res = constrained_beam_search(trie, dec, 2, 4)
    assert not res.certified.any()  # positive log-probs: no bound holds
    for r in range(2):
        assert_same(check_result(res, dec, items, trie, r, 4), loop_beam_reference(dec, r, items, 4, trie.depth))

    def never_first(prefix_codes):  # the decoder rules out every code but 0 at step 0
        out = torch.zeros(prefix_codes.shape[0], trie.vocab_size)
        if prefix_codes.shape[1] == 0:
            out[:, 1:] = float("-inf")
        return out

    res = constrained_beam_search(trie, never_first, 1, 50)
    ids = res.item_ids[0][res.item_ids[0] >= 0]
    assert ids.numel() == sum(1 for s in items if s[0] == 0) and (res.codes[0, : ids.numel(), 0] == 0).all()


def test_beam_search_refusals():
    trie = SidTrie(CATALOGS["docstring"])
    with pytest.raises(InputError, match="expected"):
        constrained_beam_search(trie, lambda p: torch.zeros(p.shape[0], 2), 2, 3)
    with pytest.raises(InputError, match="NaN"):
        constrained_beam_search(trie, lambda p: torch.full((p.shape[0], 3), float("nan")), 1, 2)
    with pytest.raises(InputError, match="beam_width"):
        constrained_beam_search(trie, lambda p: torch.zeros(p.shape[0], 3), 1, 0)


@pytest.mark.parametrize("name", list(CATALOGS))
@pytest.mark.parametrize("w", [1, 5, 50])
def test_on_select_names_the_parent_row_of_every_prefix(name, w):
    """Every row of a call (fillers included) is its parent row of the previous call plus one code, the
    parent in the same request: what a decoder's per-beam cache relies on."""
    codes = CATALOGS[name]
    trie, items = SidTrie(codes), items_of(codes)
    dec = TableDecoder(items, 3, trie.vocab_size, w, seed=w)
    calls, parents = [], []

    def step(prefix_codes):
        calls.append(prefix_codes.clone())
        return dec(prefix_codes)

    plain = constrained_beam_search(trie, dec, 3, w)
    res = constrained_beam_search(trie, step, 3, w, on_select=parents.append)
    assert torch.equal(res.item_ids, plain.item_ids)  # the hook changes nothing in the search
    assert len(parents) == trie.depth - 1
    for t, parent in enumerate(parents):
        assert parent.shape == (3 * w,) and torch.equal(parent // w, torch.arange(3 * w) // w)
        assert torch.equal(calls[t + 1][:, :t], calls[t][parent])
