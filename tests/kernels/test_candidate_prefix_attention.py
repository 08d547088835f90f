"""candidate_prefix_attention: every backend against the fp32 reference, and against
jagged_causal_attention over the concatenated [prefix ; own NS tokens] sequences."""

from __future__ import annotations

import pytest
import torch
from attention_cases import HAS_CUDA, INTERPRETER, assert_close, offsets, rand, run_with_grads

from kernels import candidate_prefix_attention, jagged_causal_attention

# (prefix lengths L_b, candidate counts C_b): one candidate, many candidates (37), requests with
# zero candidates, zero-length prefixes, prefix lengths not multiples of the tile.
CASES = {
    "one_candidate": ([5], [1]),
    "many_candidates": ([19], [37]),
    "mixed": ([4, 3, 0, 9, 0], [1, 0, 37, 2, 3]),
    "empty_prefix_only": ([0, 0], [2, 5]),
    "long_prefix": ([70, 1], [3, 4]),
}


def _inputs(case: str, n_tok: int, heads: int, dh: int, dtype, device, seed: int = 0):
    p_len, c_len = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    n_c, n_p = sum(c_len), sum(p_len)
    q, k, v = (rand((n_c, n_tok, heads, dh), dtype, device, gen) for _ in range(3))
    pk, pv = (rand((n_p, heads, dh), dtype, device, gen) for _ in range(2))
    grad = torch.randn((n_c, n_tok, heads, dh), generator=gen).to(device=device, dtype=dtype)
    return [q, k, v, pk, pv], offsets(p_len, device), offsets(c_len, device), grad


def _check_against_reference(backend, case, n_tok, heads, dh, dtype, device):
    tensors, p_off, c_off, grad = _inputs(case, n_tok, heads, dh, dtype, device)
    ref = run_with_grads(
        lambda: candidate_prefix_attention(*tensors, p_off, c_off, backend="reference"), tensors, grad
    )
    got = run_with_grads(lambda: candidate_prefix_attention(*tensors, p_off, c_off, backend=backend), tensors, grad)
    assert got[0].dtype == dtype and got[0].shape == tensors[0].shape
    for name, g, r in zip(("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, ref):
        assert_close(g, r, dtype, f"{backend}/{case}/N={n_tok}/{name}")


@pytest.mark.parametrize("native", [True, False], ids=["native", "aten"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n_tok", [1, 3])
@pytest.mark.parametrize("heads,dh", [(1, 16), (2, 32), (3, 64)])
def test_torch_backend_fp32(case, n_tok, heads, dh, native, monkeypatch):
    from kernels import torch_attention

    monkeypatch.setattr(torch_attention, "_CPU_NATIVE", native)
    _check_against_reference("torch", case, n_tok, heads, dh, torch.float32, "cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_backend_low_precision(dtype):
    _check_against_reference("torch", "mixed", 3, 2, 32, dtype, "cpu")


@pytest.mark.parametrize("fused", [True, False], ids=["cpu_flash", "explicit_math"])
def test_torch_backend_chunked(fused, monkeypatch):
    """Tiny budget: every request's candidates go through many chunks."""
    from kernels import torch_attention

    monkeypatch.setattr(torch_attention, "_SCORE_BUDGET", 100)
    monkeypatch.setattr(torch_attention, "_CPU_FLASH", fused)
    monkeypatch.setattr(torch_attention, "_CPU_NATIVE", False)  # the chunked ATen / explicit path
    _check_against_reference("torch", "mixed", 3, 2, 16, torch.float32, "cpu")


@pytest.mark.parametrize("n_tok", [1, 3])
def test_torch_backend_explicit_math_path(n_tok, monkeypatch):
    """The non-CPU torch path (explicit fp32 matmuls instead of ATen's CPU flash kernel), run on CPU."""
    from kernels import torch_attention

    monkeypatch.setattr(torch_attention, "_CPU_FLASH", False)
    monkeypatch.setattr(torch_attention, "_CPU_NATIVE", False)
    _check_against_reference("torch", "mixed", n_tok, 2, 16, torch.float32, "cpu")
    _check_against_reference("torch", "mixed", n_tok, 2, 16, torch.bfloat16, "cpu")


def _concatenated(q, k, v, pk, pv, p_off, c_off):
    """Build [prefix_b ; NS tokens of c] for every candidate as one jagged batch (q = last N rows)."""
    n_c, n_tok, h, d = q.shape
    po, co = p_off.tolist(), c_off.tolist()
    keys, vals, lengths = [], [], []
    for b in range(len(po) - 1):
        for c in range(co[b], co[b + 1]):
            keys.append(torch.cat([pk[po[b] : po[b + 1]], k[c]]))
            vals.append(torch.cat([pv[po[b] : po[b + 1]], v[c]]))
            lengths.append(po[b + 1] - po[b] + n_tok)
    kv_off = offsets(lengths, q.device)
    q_off = offsets([n_tok] * n_c, q.device)
    return q.reshape(n_c * n_tok, h, d), torch.cat(keys), torch.cat(vals), kv_off, q_off


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("n_tok", [1, 3])
def test_equals_jagged_causal_on_concatenation(backend, n_tok):
    tensors, p_off, c_off, grad = _inputs("mixed", n_tok, 2, 16, torch.float32, "cpu")
    got = run_with_grads(lambda: candidate_prefix_attention(*tensors, p_off, c_off, backend=backend), tensors, grad)

    def via_jagged():
        qq, kk, vv, kv_off, q_off = _concatenated(*tensors, p_off, c_off)
        return jagged_causal_attention(qq, kk, vv, kv_off, q_off, backend=backend).view_as(tensors[0])

    want = run_with_grads(via_jagged, tensors, grad)
    for name, g, w in zip(("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, want):
        assert_close(g, w, torch.float32, f"equivalence/{backend}/{name}")


# ---------------------------------------------------------------------------------------------
# Triton: interpreter on CPU, compiled on CUDA
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not INTERPRETER, reason="TRITON_INTERPRET=1 not set (CUDA present: compiled tests run instead)")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n_tok", [1, 3])
def test_triton_interpreter_fp32(case, n_tok):
    _check_against_reference("triton", case, n_tok, 2, 16, torch.float32, "cpu")


@pytest.mark.skipif(not INTERPRETER, reason="TRITON_INTERPRET=1 not set")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_interpreter_low_precision(dtype):
    _check_against_reference("triton", "mixed", 3, 1, 32, dtype, "cpu")


@pytest.mark.skipif(not INTERPRETER, reason="TRITON_INTERPRET=1 not set")
def test_triton_interpreter_dh64_heads3():
    _check_against_reference("triton", "long_prefix", 3, 3, 64, torch.float32, "cpu")


@pytest.mark.skipif(not INTERPRETER, reason="TRITON_INTERPRET=1 not set")
def test_triton_interpreter_equals_jagged_on_concatenation():
    tensors, p_off, c_off, grad = _inputs("mixed", 3, 1, 16, torch.float32, "cpu")
    got = run_with_grads(lambda: candidate_prefix_attention(*tensors, p_off, c_off, backend="triton"), tensors, grad)

    def via_jagged():
        qq, kk, vv, kv_off, q_off = _concatenated(*tensors, p_off, c_off)
        return jagged_causal_attention(qq, kk, vv, kv_off, q_off, backend="triton").view_as(tensors[0])

    want = run_with_grads(via_jagged, tensors, grad)
    for name, g, w in zip(("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, want):
        assert_close(g, w, torch.float32, f"equivalence/triton/{name}")


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: compiled Triton path not testable here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n_tok", [1, 3])
@pytest.mark.parametrize("heads,dh", [(1, 16), (3, 64)])
def test_triton_cuda(case, n_tok, heads, dh, dtype):
    _check_against_reference("triton", case, n_tok, heads, dh, dtype, "cuda")
