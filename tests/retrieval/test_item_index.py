"""``ItemIndex``: exact faiss search == torch brute force (ties handled), exclusion keeps k, refusals."""

from __future__ import annotations

import pytest
import torch

from recsys.errors import InputError
from recsys.retrieval.index import IndexConfig, IndexKind, ItemIndex

TOL = 1e-4


def brute_force_check(scores, ids, users, item_vecs, item_ids, k, excluded=None):
    """Tie-robust oracle: the returned scores are the top-k values of ``U @ I.T`` (float64, padding and
    excluded items removed), every returned id is a real allowed item whose true score is the returned
    one, no id twice. Among tied items any choice is right, so ids are checked through their scores."""
    full = users.double() @ item_vecs.double().T  # [B, N]
    allowed = item_ids != 0
    for b in range(users.shape[0]):
        ok = allowed.clone()
        if excluded is not None:
            ok &= ~torch.isin(item_ids, torch.tensor(sorted(excluded[b]), dtype=torch.int64))
        n_ok = int(ok.sum())
        want = torch.sort(full[b][ok], descending=True).values[:k]
        got_ids = ids[b][: len(want)].tolist()
        assert len(set(got_ids)) == len(got_ids), f"request {b}: duplicate ids {got_ids}"
        assert (ids[b][len(want):] == -1).all() and torch.isinf(scores[b][len(want):]).all()
        torch.testing.assert_close(scores[b][: len(want)].double(), want, atol=TOL, rtol=TOL)
        row = {int(i): r for r, i in enumerate(item_ids.tolist())}
        for j, item in enumerate(got_ids):
            assert item != 0 and item in row and ok[row[item]], f"request {b}: item {item} not allowed"
            assert abs(full[b, row[item]] - scores[b, j]) < TOL
        assert len(want) == min(k, n_ok)


@pytest.mark.parametrize("n,d,b,k", [(200, 16, 7, 10), (50, 8, 1, 1), (50, 8, 3, 49), (30, 4, 25, 29)])
def test_exact_matches_torch_topk(n, d, b, k):
    g = torch.Generator().manual_seed(n + k)
    items, users = torch.randn(n, d, generator=g), torch.randn(b, d, generator=g)
    index = ItemIndex(items)
    assert len(index) == n - 1  # padding row 0 is not indexed
    scores, ids = index.search(users, k)
    assert scores.shape == ids.shape == (b, k) and ids.dtype == torch.int64
    brute_force_check(scores, ids, users, items, torch.arange(n), k)
    # With no ties, the ids are exactly torch.topk's.
    ref = (users @ items[1:].T).topk(k, dim=1)
    assert torch.equal(ids, ref.indices + 1)


def test_duplicate_vectors_ties():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 8, generator=g)
    items = base[torch.randint(0, 6, (120,), generator=g)]  # only 6 distinct vectors: massive ties
    users = torch.randn(5, 8, generator=g)
    for k in (1, 7, 20, 119):
        scores, ids = ItemIndex(items).search(users, k)
        brute_force_check(scores, ids, users, items, torch.arange(120), k)


def test_custom_item_ids_are_mapped_back():
    g = torch.Generator().manual_seed(2)
    items, users = torch.randn(40, 8, generator=g), torch.randn(4, 8, generator=g)
    item_ids = torch.randperm(40, generator=g) * 7 + 3  # no padding id among them
    scores, ids = ItemIndex(items, item_ids).search(users, 40)
    brute_force_check(scores, ids, users, items, item_ids, 40)
    with_pad = item_ids.clone()
    with_pad[5] = 0
    assert len(ItemIndex(items, with_pad)) == 39


def test_exclusion_keeps_k():
    g = torch.Generator().manual_seed(3)
    n, b, k = 60, 6, 8
    items, users = torch.randn(n, 8, generator=g), torch.randn(b, 8, generator=g)
    # Request b excludes its own top items (the worst case), repeats, ids outside the catalog, nothing.
    top = (users @ items[1:].T).topk(20, dim=1).indices + 1
    excluded = [top[0, :10].tolist(), [], top[2, :3].tolist() * 3, [999, 1000, int(top[3, 0])],
                top[4, :20].tolist(), list(range(1, n))[: n - 1 - k]]
    values = torch.tensor([i for e in excluded for i in e], dtype=torch.int64)
    offsets = torch.tensor([0] + [len(e) for e in excluded]).cumsum(0)
    scores, ids = ItemIndex(items).search(users, k, values, offsets)
    assert (ids >= 1).all()  # every request still has k results
    brute_force_check(scores, ids, users, items, torch.arange(n), k, [set(e) for e in excluded])


def test_exclusion_of_almost_everything_pads_the_tail():
    g = torch.Generator().manual_seed(4)
    items, users = torch.randn(12, 4, generator=g), torch.randn(2, 4, generator=g)
    excluded = [list(range(1, 10)), [5]]  # request 0 keeps only items 10, 11
    values = torch.tensor([i for e in excluded for i in e])
    offsets = torch.tensor([0, 9, 10])
    scores, ids = ItemIndex(items).search(users, 5, values, offsets)
    assert sorted(ids[0, :2].tolist()) == [10, 11] and ids[0, 2:].eq(-1).all()
    assert torch.isinf(scores[0, 2:]).all()
    brute_force_check(scores, ids, users, items, torch.arange(12), 5, [set(e) for e in excluded])


def test_ivf_visiting_every_cell_is_exact_and_ann_outputs_are_real_items():
    g = torch.Generator().manual_seed(5)
    items, users = torch.randn(400, 16, generator=g), torch.randn(9, 16, generator=g)
    exact = ItemIndex(items).search(users, 10)
    ivf = ItemIndex(items, config=IndexConfig(kind=IndexKind.IVF, nlist=8, nprobe=8)).search(users, 10)
    torch.testing.assert_close(ivf[0], exact[0], atol=TOL, rtol=TOL)
    assert torch.equal(ivf[1], exact[1])
    for cfg in (IndexConfig(kind="ivf", nlist=16, nprobe=1), IndexConfig(kind="hnsw", hnsw_m=8, ef_search=16)):
        scores, ids = ItemIndex(items, config=cfg).search(users, 10)
        real = ids >= 0
        assert (ids[real] >= 1).all() and all(len(set(r[r >= 0].tolist())) == int((r >= 0).sum()) for r in ids)
        true = (users @ items.T).gather(1, ids.clamp(min=0))
        torch.testing.assert_close(scores[real], true[real], atol=TOL, rtol=TOL)


def test_refusals_name_the_culprit():
    items = torch.randn(10, 4)
    index = ItemIndex(items)
    cases = [
        (lambda: index.search(torch.randn(2, 4), 10), "k=10"),
        (lambda: index.search(torch.randn(2, 4), 0), "k=0"),
        (lambda: index.search(torch.randn(2, 5), 3), "5-wide"),
        (lambda: index.search(torch.tensor([[0.0, float("nan"), 0, 0]]), 3), "user vectors row 0"),
        (lambda: ItemIndex(torch.randn(1, 4)), "empty"),
        (lambda: ItemIndex(torch.cat([items, torch.full((1, 4), float("nan"))])), "item vectors row 10"),
        (lambda: ItemIndex(items, torch.tensor([1] * 10)), "duplicate"),
        (lambda: ItemIndex(items, config=IndexConfig(kind="ivf", nlist=20)), "nlist=20"),
        (lambda: IndexConfig(nprobe=0), "nprobe"),
        (lambda: index.search(torch.randn(2, 4), 3, torch.tensor([1, 2]), torch.tensor([0, 1])), "exclude_offsets"),
        (lambda: index.search(torch.randn(2, 4), 3, torch.tensor([1, 2]), None), "both"),
    ]
    for call, needle in cases:
        with pytest.raises(InputError, match=needle):
            call()
    with pytest.raises(ValueError):
        IndexConfig(kind="annoy")
