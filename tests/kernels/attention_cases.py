"""Shared helpers for the attention kernel tests: tolerances, random jagged inputs, comparisons."""

from __future__ import annotations

import os

import torch

# Tolerances against the fp32 reference computed from the SAME low-precision inputs, per dtype,
# for outputs and gradients alike:
#     |got - ref| <= atol * scale + rtol * |ref|,   scale = max(1, max |ref|)
# i.e. atol is relative to the magnitude of the tensor being compared. The Triton kernels cast P
# and dS to the input dtype before the P@V / dS@K dots (as FlashAttention does), so a bf16 element
# that is a sum with cancellation can be off by ~1% of the tensor's scale; measured worst case on
# these tests: 0.035 absolute at max|ref| = 2.9 (bf16 dq).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def offsets(lengths: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """[B] lengths -> [B+1] int64 offsets."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return out.to(device)


def rand(shape, dtype, device, gen: torch.Generator) -> torch.Tensor:
    """Leaf tensor with requires_grad, values ~N(0,1) drawn on CPU (reproducible), then moved."""
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()


def assert_close(got: torch.Tensor | None, ref: torch.Tensor | None, dtype: torch.dtype, what: str) -> None:
    """Compare in fp32; a gradient autograd reports as None (unused input) counts as zeros."""
    if ref is None and got is None:
        return
    shape = (got if got is not None else ref).shape
    got = torch.zeros(shape) if got is None else got.detach().float().cpu()
    ref = torch.zeros(shape) if ref is None else ref.detach().float().cpu()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    tol = TOL[dtype]
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(got, ref, atol=tol["atol"] * scale, rtol=tol["rtol"], msg=lambda m: f"{what}: {m}")


def run_with_grads(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor):
    """Run ``fn()`` and return (out, *grads of inputs) for the given upstream gradient."""
    out = fn()
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return (out, *grads)


def without_rows(x: torch.Tensor, bad_rows: slice) -> torch.Tensor:
    """``x`` (detached) without the rows ``bad_rows``: the outputs a non-finite input may reach."""
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    keep[bad_rows] = False
    return x.detach()[keep]
