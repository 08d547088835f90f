"""Randomized jagged shapes (hypothesis) for both ops: torch and Triton backends vs the reference."""

from __future__ import annotations

import pytest
import torch
from attention_cases import INTERPRETER, assert_close, offsets, run_with_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import candidate_prefix_attention, jagged_causal_attention

# derandomize: the same examples on every run (CI-stable); deadline off: the interpreter is slow.
FAST = settings(max_examples=25, deadline=None, derandomize=True)
INTERP = settings(max_examples=6, deadline=None, derandomize=True)


@st.composite
def jagged_shapes(draw, max_len: int):
    """(kv lengths, q lengths or None, H, Dh) with 0-length sequences and q_i in [0, L_i]."""
    kv_len = draw(st.lists(st.integers(0, max_len), min_size=1, max_size=5))
    if draw(st.booleans()):
        q_len = None
    else:
        q_len = [draw(st.integers(0, n)) for n in kv_len]
    return kv_len, q_len, draw(st.sampled_from([1, 2])), draw(st.sampled_from([16, 32, 64]))


@st.composite
def candidate_shapes(draw, max_prefix: int, max_cands: int):
    n_req = draw(st.integers(1, 4))
    p_len = draw(st.lists(st.integers(0, max_prefix), min_size=n_req, max_size=n_req))
    c_len = draw(st.lists(st.integers(0, max_cands), min_size=n_req, max_size=n_req))
    return p_len, c_len, draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 2])), draw(st.sampled_from([16, 32]))


def _check_jagged(backend: str, shape) -> None:
    kv_len, q_len, heads, dh = shape
    gen = torch.Generator().manual_seed(sum(kv_len) * 31 + heads)
    n_k = sum(kv_len)
    n_q = n_k if q_len is None else sum(q_len)
    q = torch.randn(n_q, heads, dh, generator=gen).requires_grad_()
    k = torch.randn(n_k, heads, dh, generator=gen).requires_grad_()
    v = torch.randn(n_k, heads, dh, generator=gen).requires_grad_()
    grad = torch.randn(n_q, heads, dh, generator=gen)
    kv_off, q_off = offsets(kv_len), None if q_len is None else offsets(q_len)
    ref = run_with_grads(lambda: jagged_causal_attention(q, k, v, kv_off, q_off, backend="reference"), [q, k, v], grad)
    got = run_with_grads(lambda: jagged_causal_attention(q, k, v, kv_off, q_off, backend=backend), [q, k, v], grad)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(g, r, torch.float32, f"{backend}/{shape}/{name}")


def _check_candidates(backend: str, shape) -> None:
    p_len, c_len, n_tok, heads, dh = shape
    gen = torch.Generator().manual_seed(sum(p_len) * 17 + sum(c_len))
    tensors = [torch.randn(sum(c_len), n_tok, heads, dh, generator=gen).requires_grad_() for _ in range(3)]
    tensors += [torch.randn(sum(p_len), heads, dh, generator=gen).requires_grad_() for _ in range(2)]
    grad = torch.randn(sum(c_len), n_tok, heads, dh, generator=gen)
    p_off, c_off = offsets(p_len), offsets(c_len)
    ref = run_with_grads(lambda: candidate_prefix_attention(*tensors, p_off, c_off, backend="reference"), tensors, grad)
    got = run_with_grads(lambda: candidate_prefix_attention(*tensors, p_off, c_off, backend=backend), tensors, grad)
    for name, g, r in zip(("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, ref):
        assert_close(g, r, torch.float32, f"{backend}/{shape}/{name}")


@FAST
@given(jagged_shapes(max_len=100))
def test_jagged_torch_random(shape):
    _check_jagged("torch", shape)


@FAST
@given(candidate_shapes(max_prefix=60, max_cands=40))
def test_candidates_torch_random(shape):
    _check_candidates("torch", shape)


@pytest.mark.skipif(not INTERPRETER, reason="TRITON_INTERPRET=1 not set")
@INTERP
@given(jagged_shapes(max_len=48))
def test_jagged_triton_interpreter_random(shape):
    _check_jagged("triton", shape)


@pytest.mark.skipif(not INTERPRETER, reason="TRITON_INTERPRET=1 not set")
@INTERP
@given(candidate_shapes(max_prefix=40, max_cands=12))
def test_candidates_triton_interpreter_random(shape):
    _check_candidates("triton", shape)
