"""pytest-benchmark for ``jagged_causal_attention``: providers reference / torch (/ triton on CUDA).

Shape: B = 8 jagged sequences, lengths drawn in [L/2, L] (seeded), H = 4, Dh = 32, fp32, either
full causal self-attention or a query subset (last quarter of every sequence queries).
FLOPs (forward) = sum_i 4 * H * Dh * (causal query-key pairs of sequence i); backward = 2.5x.

    .venv/bin/python -m pytest bench/kernels/bench_jagged_causal_attention.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from kernels import jagged_causal_attention

HEADS, DH, BATCH = 4, 32, 8
PROVIDERS = [
    "reference",
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="triton needs CUDA here")),
]


def _inputs(max_len: int, subset: bool, device: str):
    gen = torch.Generator().manual_seed(max_len)
    kv_len = torch.randint(max_len // 2, max_len + 1, (BATCH,), generator=gen)
    q_len = (kv_len + 3) // 4 if subset else kv_len
    kv_off = torch.nn.functional.pad(kv_len.cumsum(0), (1, 0)).to(device)
    q_off = torch.nn.functional.pad(q_len.cumsum(0), (1, 0)).to(device) if subset else None
    q = torch.randn(int(q_len.sum()), HEADS, DH, generator=gen).to(device).requires_grad_()
    k = torch.randn(int(kv_len.sum()), HEADS, DH, generator=gen).to(device).requires_grad_()
    v = torch.randn(int(kv_len.sum()), HEADS, DH, generator=gen).to(device).requires_grad_()
    pairs = sum(int(lq) * (2 * int(lk) - int(lq) + 1) // 2 for lq, lk in zip(q_len, kv_len))
    return (q, k, v, kv_off, q_off), 4 * HEADS * DH * pairs


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("subset", [False, True], ids=["full", "subset"])
@pytest.mark.parametrize("max_len", [128, 512])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_jagged_causal_attention(benchmark, provider, max_len, subset, mode):
    device = "cuda" if provider == "triton" else "cpu"
    args, flops = _inputs(max_len, subset, device)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                out = jagged_causal_attention(*args, backend=provider)
        else:
            out = jagged_causal_attention(*args, backend=provider)
            out.backward(torch.ones_like(out))
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info["gflop"] = flops * (3.5 if mode == "fwd_bwd" else 1.0) / 1e9
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    benchmark.extra_info["gflops_per_s"] = benchmark.extra_info["gflop"] / benchmark.stats.stats.median
