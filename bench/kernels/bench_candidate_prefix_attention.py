"""pytest-benchmark for ``candidate_prefix_attention``: providers reference / torch (/ triton on CUDA).

Shape: B = 4 requests, prefix L_b = L, C_b = C candidates each, N = 8 NS tokens, H = 4, Dh = 32,
fp32. FLOPs (forward) = 4 * H * Dh * sum_b C_b * (N * L_b + N * (N + 1) / 2); backward = 2.5x.

    .venv/bin/python -m pytest bench/kernels/bench_candidate_prefix_attention.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from kernels import candidate_prefix_attention

HEADS, DH, REQUESTS, NS = 4, 32, 4, 8
PROVIDERS = [
    "reference",
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="triton needs CUDA here")),
]


def _inputs(prefix: int, cands: int, device: str):
    gen = torch.Generator().manual_seed(prefix + cands)
    n_c, n_p = REQUESTS * cands, REQUESTS * prefix
    tensors = [torch.randn(n_c, NS, HEADS, DH, generator=gen).to(device).requires_grad_() for _ in range(3)]
    tensors += [torch.randn(n_p, HEADS, DH, generator=gen).to(device).requires_grad_() for _ in range(2)]
    p_off = torch.arange(REQUESTS + 1, device=device) * prefix
    c_off = torch.arange(REQUESTS + 1, device=device) * cands
    flops = 4 * HEADS * DH * n_c * (NS * prefix + NS * (NS + 1) // 2)
    return (*tensors, p_off, c_off), flops


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("cands", [1, 64])
@pytest.mark.parametrize("prefix", [256, 1024])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_candidate_prefix_attention(benchmark, provider, prefix, cands, mode):
    device = "cuda" if provider == "triton" else "cpu"
    args, flops = _inputs(prefix, cands, device)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                out = candidate_prefix_attention(*args, backend=provider)
        else:
            out = candidate_prefix_attention(*args, backend=provider)
            out.backward(torch.ones_like(out))
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info["gflop"] = flops * (3.5 if mode == "fwd_bwd" else 1.0) / 1e9
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    benchmark.extra_info["gflops_per_s"] = benchmark.extra_info["gflop"] / benchmark.stats.stats.median
