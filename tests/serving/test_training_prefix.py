"""Training shares the user prefix too: loss and every parameter gradient from the request-level
`rank` (one user pass + C candidate passes) equal those of `rank_per_candidate` (C full passes)."""

from __future__ import annotations

import pytest
import torch
from serving_helpers import SCHEMA, make_model

from recsys.model.config import PyramidConfig
from recsys.model.heads import multitask_bce
from recsys.testing import random_request_batch


@pytest.mark.parametrize("pyramid", [PyramidConfig(mode="none"), PyramidConfig(mode="linear", final=0, round_to=2)])
def test_loss_and_grads_match(pyramid):
    model = make_model(3, pyramid, max_s=16).train()
    batch = random_request_batch(SCHEMA, [(5, 3), (0, 0), (1, 0), (9, 6)], [4, 1, 3, 5], seed=11)
    grads, losses = [], []
    for path in ("rank", "rank_per_candidate"):
        model.zero_grad(set_to_none=True)
        tok = model.tokenizer(batch)  # the tokenizer is part of the graph: embeddings get gradients too
        logits = getattr(model, path)(tok)
        loss, _ = multitask_bce(logits, batch.labels)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    top = f"blocks.{len(model.blocks) - 1}."
    checked = 0
    for name, g_fast in grads[0].items():
        g_slow = grads[1][name]
        if g_fast is None:
            # the top block's S-output path feeds nothing; the fast path never computes it
            assert name.startswith(top + "s_") and not name.startswith((top + "s_qkv", top + "s_norm1")), name
            assert g_slow is None or torch.count_nonzero(g_slow) == 0, name
            continue
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-5, atol=1e-5, msg=name)
        checked += 1
    assert checked > 20
