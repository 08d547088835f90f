"""Search-based selection: hard / soft search and target attention against slow obvious references."""

from __future__ import annotations

import pytest
import torch

from recsys.data.jagged import lengths_to_offsets
from recsys.longseq.search import hard_search, soft_search, target_attention

CASES = [
    ([0], [1]),                 # empty history, one candidate
    ([1], [2]),                 # one event
    ([30, 0, 5, 200], [3, 2, 1, 7]),  # mixed, an empty history among them, many candidates
]


def random_history(lengths, n_cand, n_cat=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = sum(lengths)
    cat = torch.randint(1, n_cat, (e,), generator=g)
    ts = torch.randint(0, 20, (e,), generator=g)  # many ties in time
    cand_cat = torch.randint(1, n_cat + 1, (sum(n_cand),), generator=g)  # category n_cat never occurs
    return cat, ts, lengths_to_offsets(torch.tensor(lengths)), cand_cat, lengths_to_offsets(torch.tensor(n_cand))


def owners(offsets):
    return torch.repeat_interleave(torch.arange(len(offsets) - 1), offsets[1:] - offsets[:-1])


@pytest.mark.parametrize("k", [1, 4, 1000])
@pytest.mark.parametrize("lengths,n_cand", CASES)
def test_hard_search_picks_exactly_the_matching_category_most_recent_first(lengths, n_cand, k):
    cat, ts, ev_off, cand_cat, cand_off = random_history(lengths, n_cand, seed=k)
    cand_owner = owners(cand_off)
    idx, off = hard_search(cat, ts, ev_off, cand_cat, cand_owner, k)
    assert off.shape == (len(cand_cat) + 1,)
    for c in range(len(cand_cat)):
        b = int(cand_owner[c])
        rows = [j for j in range(int(ev_off[b]), int(ev_off[b + 1])) if int(cat[j]) == int(cand_cat[c])]
        rows.sort(key=lambda j: (int(ts[j]), j), reverse=True)  # most recent first; later row wins a tie
        assert idx[off[c]:off[c + 1]].tolist() == rows[:k]


@pytest.mark.parametrize("k", [1, 3, 1000])
@pytest.mark.parametrize("lengths,n_cand", CASES)
def test_soft_search_is_topk_inner_product(lengths, n_cand, k):
    g = torch.Generator().manual_seed(k)
    ev_off = lengths_to_offsets(torch.tensor(lengths))
    cand_off = lengths_to_offsets(torch.tensor(n_cand))
    ev_keys = torch.randn(sum(lengths), 4, generator=g)
    cand_keys = torch.randn(sum(n_cand), 4, generator=g)
    idx, off = soft_search(cand_keys, ev_keys, ev_off, cand_off, k)
    cand_owner = owners(cand_off)
    for c in range(len(cand_keys)):
        b = int(cand_owner[c])
        rows = list(range(int(ev_off[b]), int(ev_off[b + 1])))
        rows.sort(key=lambda j: float(cand_keys[c] @ ev_keys[j]), reverse=True)
        assert idx[off[c]:off[c + 1]].tolist() == rows[:k]


def test_target_attention_is_softmax_pooling_per_candidate():
    g = torch.Generator().manual_seed(0)
    n = torch.tensor([3, 0, 1, 5])
    off = lengths_to_offsets(n)
    logits, values = torch.randn(int(n.sum()), generator=g), torch.randn(int(n.sum()), 6, generator=g)
    out = target_attention(logits, values, off)
    for c in range(len(n)):
        a, b = int(off[c]), int(off[c + 1])
        ref = torch.softmax(logits[a:b], 0) @ values[a:b] if b > a else torch.zeros(6)
        torch.testing.assert_close(out[c], ref)
