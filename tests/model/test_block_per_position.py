"""The NS per-position maps run as one batched matmul; pinned against the obvious per-token loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recsys.model.block import OneTransBlock, PerPositionLinear, PerPositionRMSNorm


def per_token_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Reference: ``x [M, N, in]``, token n through its own ``weight[n] [in, out]``, ``bias[n]``."""
    return torch.stack([x[:, n] @ weight[n] + bias[n] for n in range(weight.shape[0])], 1)


def per_token_ns_finish(blk: OneTransBlock, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Reference of ``OneTransBlock.ns_finish``, one NS position at a time."""
    m, n = x.shape[:2]
    a = attn.reshape(m, n, -1)
    z = x + per_token_linear(a, blk.ns_out.weight, blk.ns_out.bias)
    h = torch.stack([F.rms_norm(z[:, i], (z.shape[-1],), eps=blk.ns_norm2.eps) * blk.ns_norm2.weight[i]
                     for i in range(n)], 1)
    h = F.silu(per_token_linear(h, blk.ns_ffn1.weight, blk.ns_ffn1.bias))
    return z + per_token_linear(h, blk.ns_ffn2.weight, blk.ns_ffn2.bias)


@pytest.mark.parametrize("m,n,d_in,d_out", [(7, 3, 8, 5), (1, 1, 4, 4), (0, 2, 3, 6), (33, 4, 16, 48)])
def test_per_position_linear_equals_per_token_loop(m, n, d_in, d_out):
    torch.manual_seed(m + n)
    lin = PerPositionLinear(n, d_in, d_out)
    x = torch.randn(m, n, d_in, requires_grad=True)
    out = lin(x)
    ref = per_token_linear(x, lin.weight, lin.bias)
    assert out.shape == (m, n, d_out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if m:
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, lin.weight, lin.bias), g)
        want = torch.autograd.grad(ref, (x, lin.weight, lin.bias), g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_positions_do_not_mix():
    """Changing token n's input changes only token n's output (each position its own weights)."""
    torch.manual_seed(0)
    lin = PerPositionLinear(4, 8, 8)
    x = torch.randn(5, 4, 8)
    y = x.clone()
    y[:, 2] += 1.0
    diff = (lin(x) - lin(y)).abs().amax(dim=(0, 2))
    assert diff[2] > 0 and torch.all(diff[[0, 1, 3]] == 0)


def test_per_position_norm_gain_per_position():
    norm = PerPositionRMSNorm(3, 4)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(12, dtype=torch.float32).view(3, 4))
    x = torch.randn(2, 3, 4)
    ref = torch.stack([F.rms_norm(x[:, i], (4,), eps=1e-6) * norm.weight[i] for i in range(3)], 1)
    torch.testing.assert_close(norm(x), ref, atol=1e-6, rtol=1e-6)


def test_ns_finish_equals_per_token_reference():
    torch.manual_seed(1)
    blk = OneTransBlock(d_model=16, n_heads=2, ffn_hidden=24, n_ns=3)
    x = torch.randn(6, 3, 16)
    attn = torch.randn(6, 3, 2, 8)
    torch.testing.assert_close(blk.ns_finish(x, attn), per_token_ns_finish(blk, x, attn), atol=1e-5, rtol=1e-5)


def test_per_position_linear_runs_in_bf16_under_autocast():
    """Under ``train.bf16`` (CPU autocast) the NS maps give bf16 like the S side's ``F.linear``, so the attention op
    sees one dtype (an einsum stayed fp32 and met bf16 prefix keys); values within bf16 rounding of fp32."""
    torch.manual_seed(0)
    lin = PerPositionLinear(3, 16, 24)
    x = torch.randn(9, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), per_token_linear(x, lin.weight, lin.bias), atol=5e-2, rtol=2e-2)


def test_ranker_trains_a_step_under_bf16_autocast():
    """The ranker's training forward + backward under CPU bf16 autocast: logits within bf16 rounding of fp32."""
    from recsys.model.config import ModelConfig
    from recsys.model.heads import multitask_bce
    from recsys.model.ranker import OneTransRanker
    from recsys.testing import random_request_batch, tiny_schema

    schema = tiny_schema()
    torch.manual_seed(0)
    model = OneTransRanker(schema, ModelConfig(d_model=32, n_heads=2, n_layers=2, n_ns_tokens=2, emb_dim=8,
                                               head_hidden=16, attention_backend="torch"), 64)
    batch = random_request_batch(schema, [9, 0, 4], [2, 1, 3], seed=1)
    want = model(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(batch)
        loss = multitask_bce(got.float(), batch.labels)[0]
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


def test_ranker_dense_bf16_matches_fp32_within_bf16_rounding():
    """``model.dense_bf16``: the blocks' projections and FFNs as bf16 matmuls from the fp32 master weights. Logits and
    weight gradients within bf16 rounding of the fp32 model's (same weights), gradients fp32 on fp32 parameters, and
    the option is not ignored (the logits differ)."""
    from recsys.model.config import ModelConfig
    from recsys.model.heads import multitask_bce
    from recsys.model.ranker import OneTransRanker
    from recsys.testing import random_request_batch, tiny_schema

    schema = tiny_schema()
    batch = random_request_batch(schema, [9, 0, 4], [2, 1, 3], seed=1)
    runs = []
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = OneTransRanker(schema, ModelConfig(d_model=32, n_heads=2, n_layers=2, n_ns_tokens=2, emb_dim=8,
                                                   head_hidden=16, attention_backend="torch", dense_bf16=bf16), 64)
        logits = model(batch)
        multitask_bce(logits, batch.labels)[0].backward()
        runs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_g), (got, got_g) = runs
    assert got.dtype == torch.float32 and not torch.equal(got, want)
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
    assert want_g.keys() == got_g.keys()
    for name, g in got_g.items():
        assert g.dtype == torch.float32, name
        scale = want_g[name].abs().max().clamp_min(1e-3)
        assert (g - want_g[name]).abs().max() <= 0.1 * scale, name


def test_bf16_row_buckets_bound_padding_and_leave_real_rows_alone():
    """``model.dense_bf16`` pads the rows of its matmuls to a few sizes per octave (so oneDNN reuses its bf16
    kernels across batches): at most 12.5% padding, exact below 16 rows, monotone; the padded product's real rows
    and the weight gradient match the unpadded bf16 product."""
    from recsys.model.block import bucket_rows, linear_bf16

    sizes = [bucket_rows(m) for m in range(1, 5000)]
    assert all(b >= m and b <= m * 1.125 for m, b in zip(range(1, 5000), sizes))
    assert sizes[:15] == list(range(1, 16)) and sizes == sorted(sizes)
    assert len(set(bucket_rows(m) for m in range(4097, 8193))) == 8  # 8 shapes per octave
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 24)
    x = torch.randn(1001, 16)  # -> 1024 rows
    assert bucket_rows(1001) == 1024
    got = linear_bf16(x, lin.weight, lin.bias)
    assert got.shape == (1001, 24) and got.dtype == torch.bfloat16
    want = F.linear(x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16())
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=1e-2)
    g = torch.randn(1001, 24)
    (dw,) = torch.autograd.grad((linear_bf16(x, lin.weight, lin.bias).float() * g).sum(), lin.weight)
    torch.testing.assert_close(dw, g.T @ x, atol=0.5, rtol=2e-2)  # bf16 products of 1001 rows
