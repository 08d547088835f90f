"""The fused rotary (q and k in one pass, written into halves, no ``cat``) equals the obvious form, on both CPU
paths: the native kernel (``kernels/cpu_native.py``, fp32) and the ATen one."""

from __future__ import annotations

import shutil

import pytest
import torch

from kernels import cpu_native
from recsys.model.block import OneTransBlock, rotary, rotary_parts, rotary_reference


@pytest.fixture(autouse=True, params=["native", "aten"])
def rotary_path(request, monkeypatch):
    """Every test runs on both rotary paths; the native one must really be taken where it is asked for."""
    if request.param == "aten":
        monkeypatch.setattr(cpu_native, "rotary_supported", lambda x: False)
    elif shutil.which("g++") is None:
        pytest.skip("no g++ on this machine: the native rotary kernel cannot be built")
    else:
        assert cpu_native.rotary_supported(torch.zeros(1, 2)), "native kernels not built"
    return request.param


@pytest.mark.parametrize("m,h,dh", [(9, 4, 16), (1, 1, 2), (0, 2, 8), (37, 3, 6)])
def test_rotary_equals_cat_form_values_and_grads(m, h, dh):
    torch.manual_seed(m + dh)
    x = torch.randn(m, h, dh, requires_grad=True)
    pos = torch.randint(0, 3000, (m,))
    out, ref = rotary(x, pos), rotary_reference(x, pos)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    if m:
        g = torch.randn_like(out)
        (got,), (want,) = torch.autograd.grad(out, x, g), torch.autograd.grad(ref, x, g)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_rotary_parts_rotates_q_k_copies_v_and_routes_grads():
    torch.manual_seed(0)
    qkv = torch.randn(5, 3, 3, 2, 8, requires_grad=True)  # [C, N, 3, H, Dh]
    pos = torch.randint(0, 500, (5, 3))
    q, k, v = rotary_parts(qkv, pos, 2)
    flat = pos.reshape(-1)
    ref = [rotary_reference(qkv[:, :, p].reshape(15, 2, 8), flat).view(5, 3, 2, 8) for p in range(2)]
    ref.append(qkv[:, :, 2])
    for got, want in zip((q, k, v), ref):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    gs = [torch.randn_like(q) for _ in range(3)]
    got = torch.autograd.grad((q * gs[0]).sum() + (v * gs[2]).sum(), qkv)[0]  # k's grad is None
    want = torch.autograd.grad((ref[0] * gs[0]).sum() + (ref[2] * gs[2]).sum(), qkv)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def _projections_reference(blk: OneTransBlock, x_s, keep, pos_s, x_ns, pos_ns):
    """The block's projections with the obvious rotary (one ``cat`` per tensor)."""
    d, h, dh = blk.d, blk.h, blk.dh
    hs = blk.s_norm1(x_s)
    w, b = blk.s_qkv.weight, blk.s_qkv.bias
    q = torch.nn.functional.linear(hs[keep], w[:d], b[:d]).view(-1, h, dh)
    k, v = torch.nn.functional.linear(hs, w[d:], b[d:]).view(-1, 2, h, dh).unbind(1)
    s = (rotary_reference(q, pos_s[keep]), rotary_reference(k, pos_s), v)
    c, n = x_ns.shape[:2]
    qn, kn, vn = blk.ns_qkv(blk.ns_norm1(x_ns)).view(c, n, 3, h, dh).unbind(2)
    flat = pos_ns.reshape(-1)
    ns = (rotary_reference(qn.reshape(c * n, h, dh), flat).view(c, n, h, dh),
          rotary_reference(kn.reshape(c * n, h, dh), flat).view(c, n, h, dh), vn)
    return s + ns


def test_block_projections_equal_reference_values_and_grads():
    torch.manual_seed(1)
    blk = OneTransBlock(32, 4, 64, 3)
    x_s, x_ns = torch.randn(20, 32, requires_grad=True), torch.randn(6, 3, 32, requires_grad=True)
    keep, pos_s = torch.tensor([3, 4, 9, 15, 19]), torch.arange(20) % 7
    pos_ns = torch.randint(0, 30, (6, 3))
    got = blk.s_project(x_s, keep, pos_s) + blk.ns_project(x_ns, pos_ns)
    want = _projections_reference(blk, x_s, keep, pos_s, x_ns, pos_ns)
    gs = [torch.randn_like(t) for t in got]
    params = (x_s, x_ns, *blk.parameters())
    g_got = torch.autograd.grad(sum((t * g).sum() for t, g in zip(got, gs)), params, allow_unused=True)
    g_want = torch.autograd.grad(sum((t * g).sum() for t, g in zip(want, gs)), params, allow_unused=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for a, b in zip(g_got, g_want):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
