"""jagged_causal_attention: every backend against the fp32 reference (forward and backward)."""

from __future__ import annotations

import pytest
import torch
from attention_cases import HAS_CUDA, INTERPRETER, assert_close, offsets, rand, run_with_grads

from kernels import AttentionBackend, jagged_causal_attention

# (kv lengths, q lengths or None): lengths 0, 1, not multiples of 16/32, mixed long/short,
# query subsets with q_i < L_i, q_i = 0 and q_i = L_i.
CASES = {
    "single": ([7], None),
    "zero_and_one": ([0, 1, 0, 3], None),
    "ragged": ([33, 1, 17, 0, 50], None),
    "subset": ([33, 1, 17, 0, 50], [5, 1, 0, 0, 50]),
    "subset_last_only": ([40, 9, 65], [1, 1, 1]),
    "long_short": ([97, 2, 3, 1], [40, 2, 0, 1]),
}


def _inputs(case: str, heads: int, dh: int, dtype, device, seed: int = 0):
    kv_len, q_len = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    n_k = sum(kv_len)
    n_q = n_k if q_len is None else sum(q_len)
    q = rand((n_q, heads, dh), dtype, device, gen)
    k = rand((n_k, heads, dh), dtype, device, gen)
    v = rand((n_k, heads, dh), dtype, device, gen)
    grad = torch.randn((n_q, heads, dh), generator=gen).to(device=device, dtype=dtype)
    kv_off = offsets(kv_len, device)
    q_off = None if q_len is None else offsets(q_len, device)
    return q, k, v, kv_off, q_off, grad


def _check_against_reference(backend: str, case: str, heads: int, dh: int, dtype, device) -> None:
    q, k, v, kv_off, q_off, grad = _inputs(case, heads, dh, dtype, device)
    ref = run_with_grads(
        lambda: jagged_causal_attention(q, k, v, kv_off, q_off, backend="reference"), [q, k, v], grad
    )
    got = run_with_grads(lambda: jagged_causal_attention(q, k, v, kv_off, q_off, backend=backend), [q, k, v], grad)
    assert got[0].dtype == dtype and got[0].shape == q.shape
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(g, r, dtype, f"{backend}/{case}/{name}")


@pytest.mark.parametrize("native", [True, False], ids=["native", "aten"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads,dh", [(1, 16), (2, 32), (3, 64)])
def test_torch_backend_fp32(case, heads, dh, native, monkeypatch):
    from kernels import torch_attention

    monkeypatch.setattr(torch_attention, "_CPU_NATIVE", native)
    _check_against_reference("torch", case, heads, dh, torch.float32, "cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["ragged", "subset"])
def test_torch_backend_low_precision(case, dtype):
    _check_against_reference("torch", case, 2, 32, dtype, "cpu")


@pytest.mark.parametrize("fused", [True, False], ids=["cpu_flash", "explicit_math"])
def test_torch_backend_chunked(fused, monkeypatch):
    """Tiny budget: sequences split over many chunks and long ones into query-row blocks."""
    from kernels import torch_attention

    monkeypatch.setattr(torch_attention, "_SCORE_BUDGET", 120)
    monkeypatch.setattr(torch_attention, "_CPU_FLASH", fused)
    monkeypatch.setattr(torch_attention, "_CPU_NATIVE", False)  # the chunked ATen / explicit path
    kv_len, q_len = CASES["long_short"]
    chunks = torch_attention._plan_chunks(offsets(kv_len).tolist(), offsets(q_len).tolist(), 2, 16, fused)
    assert any(c.q_hi - c.q_lo < q for c in chunks for q in q_len[:1]), "long sequence not split into row blocks"
    for case in ("ragged", "subset", "long_short"):
        _check_against_reference("torch", case, 2, 16, torch.float32, "cpu")


@pytest.mark.parametrize("case", ["ragged", "subset", "long_short"])
def test_torch_backend_explicit_math_path(case, monkeypatch):
    """The non-CPU torch path (explicit fp32 matmuls instead of ATen's CPU flash kernel), run on CPU."""
    from kernels import torch_attention

    monkeypatch.setattr(torch_attention, "_CPU_FLASH", False)
    monkeypatch.setattr(torch_attention, "_CPU_NATIVE", False)
    _check_against_reference("torch", case, 2, 16, torch.float32, "cpu")
    _check_against_reference("torch", case, 2, 16, torch.bfloat16, "cpu")


def test_chunk_grids_cover_every_row_once_and_pad_with_own_rows_or_zeros():
    """Slot grids over the original (unsorted) rows: every query row in exactly one chunk, every key row of a
    sequence in the chunks of its queries, the gather equals the obvious padding, and padding -1 -> a copy of
    the sequence's own first row (zero slots with ``zero=True``)."""
    from kernels import torch_attention as ta

    kv_len = [5, 0, 9, 2, 9, 1]
    q_len = [2, 0, 9, 1, 3, 1]
    kv, qo = offsets(kv_len).tolist(), offsets(q_len).tolist()
    kv2, qo2, k_rows, q_rows = ta._length_sorted(kv, qo, torch.device("cpu"))
    seen_q = []
    x = torch.randn(kv[-1], 2, 3, generator=torch.Generator().manual_seed(0))
    for c in ta._plan_chunks(kv2, qo2, 2, 3, True, budget=60):
        if c.q_hi == c.q_lo:
            continue
        q_idx, k_idx = ta._chunk_grids(c, q_rows, k_rows, torch.device("cpu"))
        seen_q += q_idx[q_idx >= 0].tolist()
        padded, zeroed = ta._pad_rows(x, k_idx), ta._pad_rows(x, k_idx, zero=True)  # [n, H, Lmax, 3]
        for i in range(k_idx.shape[0]):
            real = k_idx[i][k_idx[i] >= 0]
            for grid in (padded, zeroed):
                torch.testing.assert_close(grid[i, :, : len(real)].transpose(0, 1), x[real], rtol=0, atol=0)
            assert zeroed[i, :, len(real):].abs().sum() == 0
            if not len(real):  # an empty sequence in the chunk
                continue
            own_first = x[real[0]].expand(k_idx.shape[1] - len(real), *x.shape[1:])
            torch.testing.assert_close(padded[i, :, len(real):].transpose(0, 1), own_first, rtol=0, atol=0)
            seq = next(s for s in range(len(kv_len)) if kv[s] <= int(real[0]) < kv[s + 1])  # rows of one sequence
            assert real.tolist() == list(range(kv[seq], kv[seq] + len(real)))
    assert sorted(seen_q) == list(range(qo[-1]))


def test_default_scale_and_explicit_scale():
    q, k, v, kv_off, q_off, _ = _inputs("subset", 2, 16, torch.float32, "cpu")
    a = jagged_causal_attention(q, k, v, kv_off, q_off, backend="torch")
    b = jagged_causal_attention(q, k, v, kv_off, q_off, scale=0.25, backend="torch")
    r = jagged_causal_attention(q, k, v, kv_off, q_off, scale=0.25, backend="reference")
    assert_close(b, r, torch.float32, "scale=0.25")
    assert_close(a, jagged_causal_attention(q, k, v, kv_off, q_off, scale=0.25, backend="reference"), torch.float32, "default scale 1/sqrt(16)")


def test_auto_is_torch_on_cpu():
    q, k, v, kv_off, q_off, _ = _inputs("ragged", 2, 16, torch.float32, "cpu")
    torch.testing.assert_close(
        jagged_causal_attention(q, k, v, kv_off, q_off),
        jagged_causal_attention(q, k, v, kv_off, q_off, backend=AttentionBackend.TORCH),
        rtol=0, atol=0,
    )


# ---------------------------------------------------------------------------------------------
# Triton: interpreter on CPU, compiled on CUDA
# ---------------------------------------------------------------------------------------------
INTERP_CASES = ["zero_and_one", "ragged", "subset", "subset_last_only", "long_short"]


@pytest.mark.skipif(not INTERPRETER, reason="TRITON_INTERPRET=1 not set (CUDA present: compiled tests run instead)")
@pytest.mark.parametrize("case", INTERP_CASES)
@pytest.mark.parametrize("heads,dh", [(1, 16), (2, 32)])
def test_triton_interpreter_fp32(case, heads, dh):
    _check_against_reference("triton", case, heads, dh, torch.float32, "cpu")


@pytest.mark.skipif(not INTERPRETER, reason="TRITON_INTERPRET=1 not set")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_interpreter_low_precision(dtype):
    _check_against_reference("triton", "subset", 2, 16, dtype, "cpu")


@pytest.mark.skipif(not INTERPRETER, reason="TRITON_INTERPRET=1 not set")
def test_triton_interpreter_dh64():
    _check_against_reference("triton", "long_short", 1, 64, torch.float32, "cpu")


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: compiled Triton path not testable here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads,dh", [(1, 16), (2, 32), (3, 64)])
def test_triton_cuda(case, heads, dh, dtype):
    _check_against_reference("triton", case, heads, dh, dtype, "cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: compiled Triton path not testable here")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_backend_cuda(dtype):
    _check_against_reference("torch", "subset", 2, 32, dtype, "cuda")
