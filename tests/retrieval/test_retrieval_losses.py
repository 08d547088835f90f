"""Retrieval losses == a direct reference written with loops and ``torch.log_softmax`` (values and grads)."""

from __future__ import annotations

import math

import pytest
import torch

from recsys.errors import InputError
from recsys.retrieval.losses import (
    RetrievalLossConfig,
    deduplicated_sampled_softmax_loss,
    full_softmax_loss,
    retrieval_loss,
    sampled_softmax_loss,
    uniform_negatives,
)


def reference_sampled(user, t_ids, t_vecs, t_logq, s_ids, s_vecs, s_logq, tau):
    """Row by row: list the columns one at a time, drop accidental hits, log-softmax, take the positive."""
    cols = [(int(t_ids[j]), t_vecs[j], t_logq[j]) for j in range(len(t_ids))]
    cols += [(int(s_ids[j]), s_vecs[j], s_logq[j]) for j in range(len(s_ids))]
    out = []
    for b in range(user.shape[0]):
        logits = []
        for j, (item, vec, logq) in enumerate(cols):
            if j != b and item == int(t_ids[b]):
                continue  # accidental hit
            logit = torch.dot(user[b], vec) / tau - logq
            logits.append(logit)
            if j == b:
                pos = len(logits) - 1
        out.append(-torch.log_softmax(torch.stack(logits), 0)[pos])
    return torch.stack(out)


def make(seed, b, n, d, num_items, dup_targets=False):
    g = torch.Generator().manual_seed(seed)
    t_ids = torch.randint(1, 4 if dup_targets else num_items, (b,), generator=g)
    s_ids = torch.randint(1, num_items, (n,), generator=g)
    if n:
        s_ids[0] = t_ids[0]  # at least one uniform accidental hit
    table = torch.randn(num_items, d, generator=g, dtype=torch.float64)
    user = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
    t_logq = torch.rand(b, generator=g, dtype=torch.float64).log()
    s_logq = torch.full((n,), math.log(n / (num_items - 1)) if n else 0.0, dtype=torch.float64)
    return user, t_ids, table, t_logq, s_ids, s_logq


@pytest.mark.parametrize("seed,b,n,d,num_items,dup", [(0, 6, 9, 5, 50, False), (1, 8, 0, 4, 30, True),
                                                      (2, 1, 3, 3, 10, False), (3, 10, 20, 6, 5, True)])
def test_sampled_softmax_matches_loop_reference(seed, b, n, d, num_items, dup):
    user, t_ids, table, t_logq, s_ids, s_logq = make(seed, b, n, d, num_items, dup)
    tau = 0.3
    got = sampled_softmax_loss(user, t_ids, table[t_ids], t_logq, s_ids, table[s_ids], s_logq, tau)
    want = reference_sampled(user, t_ids, table[t_ids], t_logq, s_ids, table[s_ids], s_logq, tau)
    torch.testing.assert_close(got, want)
    g_got, = torch.autograd.grad(got.sum(), user)
    g_want, = torch.autograd.grad(want.sum(), user)
    torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("seed,b,n,num_items,item_log_q", [(0, 40, 9, 6, True), (1, 64, 0, 12, True),
                                                              (2, 30, 5, 2, True), (3, 25, 7, 8, False),
                                                              (4, 5, 3, 100, True)])
def test_deduplicated_sampled_softmax_equals_the_materialised_form(seed, b, n, num_items, item_log_q):
    """Many positions, few distinct target items (the two-tower case), values and gradients of the user vectors
    and of the item table; ``item_log_q=False``: log q per row (not a function of the item), the fallback."""
    g = torch.Generator().manual_seed(seed)
    t_ids = torch.randint(1, num_items, (b,), generator=g)
    s_ids = torch.randint(1, num_items, (n,), generator=g)
    table = torch.randn(num_items, 5, generator=g, dtype=torch.float64, requires_grad=True)
    user = torch.randn(b, 5, generator=g, dtype=torch.float64, requires_grad=True)
    per_item = torch.rand(num_items, generator=g, dtype=torch.float64).log()
    t_logq = per_item[t_ids] if item_log_q else torch.rand(b, generator=g, dtype=torch.float64).log()
    s_logq = torch.full((n,), math.log(max(n, 1) / (num_items - 1)), dtype=torch.float64)
    sampled = (s_ids, s_logq) if n else (None, None)
    got = deduplicated_sampled_softmax_loss(user, t_ids, table, t_logq, *sampled, temperature=0.4)
    want = sampled_softmax_loss(user, t_ids, table[t_ids], t_logq, sampled[0],
                                table[s_ids] if n else None, sampled[1], 0.4)
    torch.testing.assert_close(got, want)
    if b <= 40:  # and the loop reference
        torch.testing.assert_close(got, reference_sampled(user, t_ids, table[t_ids], t_logq, s_ids, table[s_ids],
                                                          s_logq, 0.4))
    for g_got, g_want in zip(torch.autograd.grad(got.sum(), (user, table)),
                             torch.autograd.grad(want.sum(), (user, table))):
        torch.testing.assert_close(g_got, g_want)


def test_deduplicated_sampled_softmax_one_item_everywhere():
    """Every position has the same target: each row sees only its own column (plus non-hit draws)."""
    user = torch.randn(7, 3, dtype=torch.float64)
    table = torch.randn(4, 3, dtype=torch.float64)
    t_ids = torch.full((7,), 2)
    got = deduplicated_sampled_softmax_loss(user, t_ids, table, torch.zeros(7, dtype=torch.float64))
    torch.testing.assert_close(got, torch.zeros(7, dtype=torch.float64))
    want = sampled_softmax_loss(user, t_ids, table[t_ids], torch.zeros(7, dtype=torch.float64))
    torch.testing.assert_close(got, want)


def test_all_hits_leave_only_the_positive():
    user, _, table, t_logq, _, _ = make(4, 5, 0, 4, 20)
    t_ids = torch.full((5,), 7)
    s_ids = torch.full((6,), 7)
    loss = sampled_softmax_loss(user, t_ids, table[t_ids], t_logq, s_ids, table[s_ids], torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(loss, torch.zeros(5, dtype=torch.float64))


def test_logq_correction_changes_the_loss_and_is_a_per_column_shift():
    user, t_ids, table, _, s_ids, s_logq = make(5, 6, 4, 4, 1000)
    zero = torch.zeros(6, dtype=torch.float64)
    skew = torch.linspace(-5, 0, 6, dtype=torch.float64)
    a = sampled_softmax_loss(user, t_ids, table[t_ids], zero, s_ids, table[s_ids], s_logq)
    c = sampled_softmax_loss(user, t_ids, table[t_ids], skew, s_ids, table[s_ids], s_logq)
    assert not torch.allclose(a, c)
    # A constant shift of every column's log q leaves the softmax unchanged.
    d = sampled_softmax_loss(user, t_ids, table[t_ids], zero + 3, s_ids, table[s_ids], s_logq + 3)
    torch.testing.assert_close(a, d)


def test_full_softmax_matches_reference_and_ignores_padding():
    user, t_ids, table, *_ = make(6, 7, 0, 5, 12)
    got = full_softmax_loss(user, t_ids, table, 0.5)
    want = torch.stack([-torch.log_softmax(user[b] @ table[1:].T / 0.5, 0)[int(t_ids[b]) - 1] for b in range(7)])
    torch.testing.assert_close(got, want)


def test_retrieval_loss_dispatch_and_refusals():
    user, t_ids, table, t_logq, *_ = make(7, 4, 0, 3, 40)
    small = RetrievalLossConfig(temperature=0.5, full_softmax_max_items=40)
    torch.testing.assert_close(retrieval_loss(user, t_ids, t_logq, table, small),
                               full_softmax_loss(user, t_ids, table, 0.5).mean())
    big = RetrievalLossConfig(temperature=0.5, num_negatives=8, full_softmax_max_items=10)
    s_ids, s_logq = uniform_negatives(40, 8, torch.Generator().manual_seed(0))
    assert s_ids.min() >= 1 and s_ids.max() < 40
    want = sampled_softmax_loss(user, t_ids, table[t_ids], t_logq, s_ids, table[s_ids], s_logq.double(), 0.5).mean()
    torch.testing.assert_close(retrieval_loss(user, t_ids, t_logq, table, big, torch.Generator().manual_seed(0)),
                               want)
    with pytest.raises(InputError, match="target ids"):
        retrieval_loss(user, torch.tensor([0, 1, 2, 3]), t_logq, table, small)
    with pytest.raises(InputError, match="temperature"):
        RetrievalLossConfig(temperature=0)
    with pytest.raises(InputError, match="sampled_vecs"):
        sampled_softmax_loss(user, t_ids, table[t_ids], t_logq, torch.tensor([1]))
