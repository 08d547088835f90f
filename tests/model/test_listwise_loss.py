"""``multitask_listwise`` (``train.loss=listwise``) against a per-request loop written from its definition:
softmax cross-entropy of each request's positives among its candidates, per task, requests with nothing
to rank (no positive or no negative) at 0, candidate-weighted mean; its gradient; task weights."""

from __future__ import annotations

import math

import pytest
import torch

from recsys.model.heads import multitask_listwise


def reference(logits: torch.Tensor, labels: torch.Tensor, offsets: list[int], weights: list[float] | None
              ) -> tuple[float, list[float]]:
    n_tasks = logits.shape[1]
    per_task = []
    for t in range(n_tasks):
        total = 0.0
        for b in range(len(offsets) - 1):
            s = logits[offsets[b]:offsets[b + 1], t].double().tolist()
            y = labels[offsets[b]:offsets[b + 1], t].tolist()
            pos = [c for c, v in enumerate(y) if v > 0]
            if not pos or len(pos) == len(y):
                continue
            m = max(s)
            lse = m + math.log(sum(math.exp(v - m) for v in s))
            total += len(y) * sum(lse - s[c] for c in pos) / len(pos)
        per_task.append(total / offsets[-1])
    w = weights or [1.0] * n_tasks
    return sum(a * b for a, b in zip(per_task, w)), per_task


def random_case(gen: torch.Generator, sizes: list[int], n_tasks: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    offsets = [0]
    for c in sizes:
        offsets.append(offsets[-1] + c)
    logits = torch.randn(offsets[-1], n_tasks, generator=gen) * 4
    labels = (torch.rand(offsets[-1], n_tasks, generator=gen) < 0.3).float()
    return logits, labels, offsets


@pytest.mark.parametrize("seed", range(4))
def test_matches_the_per_request_reference_on_random_jagged_batches(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 9, (7,), generator=gen).tolist()
    logits, labels, offsets = random_case(gen, sizes, 2)
    weights = [0.7, 1.9] if seed % 2 else None
    loss, per_task = multitask_listwise(logits, labels, torch.tensor(offsets), weights)
    want, want_per_task = reference(logits, labels, offsets, weights)
    assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert per_task.tolist() == pytest.approx(want_per_task, rel=1e-5, abs=1e-6)


def test_edge_cases_one_candidate_all_positive_no_positive_and_large_logits():
    # request 0: one candidate (nothing to rank); 1: all positive; 2: no positive; 3: a real ranking with
    # logits far outside exp's range (the max-shift keeps it finite)
    logits = torch.tensor([[3.0], [1.0], [2.0], [0.5], [-1.0], [900.0], [880.0], [-700.0]])
    labels = torch.tensor([[1.0], [1.0], [1.0], [0.0], [0.0], [0.0], [1.0], [0.0]])
    offsets = [0, 1, 3, 5, 8]
    loss, per_task = multitask_listwise(logits, labels, torch.tensor(offsets))
    assert math.isfinite(float(loss))
    assert float(loss) == pytest.approx(3 * 20.0 / 8, rel=1e-5)  # only request 3: C_b * (lse - s_pos) / sum C
    assert reference(logits, labels, offsets, None)[0] == pytest.approx(float(loss), rel=1e-5)


def test_gradient_matches_softmax_minus_target():
    gen = torch.Generator().manual_seed(7)
    logits, labels, offsets = random_case(gen, [5, 4, 6], 1)
    labels[0, 0], labels[1:5, 0] = 1.0, 0.0  # request 0: one positive among five
    logits.requires_grad_(True)
    multitask_listwise(logits, labels, torch.tensor(offsets))[0].backward()
    g = logits.grad[0:5, 0]
    p = torch.softmax(logits.detach()[0:5, 0], 0)
    target = torch.tensor([1.0, 0, 0, 0, 0])
    assert torch.allclose(g, 5 / offsets[-1] * (p - target), atol=1e-6)


def test_an_empty_batch_and_a_bad_weight_count():
    loss, per_task = multitask_listwise(torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(1, dtype=torch.long))
    assert float(loss) == 0.0 and per_task.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="task weights"):
        multitask_listwise(torch.zeros(3, 2), torch.ones(3, 2), torch.tensor([0, 3]), [1.0])
