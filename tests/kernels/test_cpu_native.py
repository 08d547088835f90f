"""Small-head native CPU kernels (``kernels/cpu_native.py``) against the references: shapes past every block size
of the C++ file (64-key score blocks, 128-row query tasks, 16-candidate tasks), edge cases, NaN isolation,
thread-count independence, and which calls they take."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from attention_cases import assert_close, offsets, rand, run_with_grads, without_rows

from kernels import candidate_prefix_attention, cpu_native, jagged_causal_attention
from kernels import torch_attention as ta

NO_COMPILER = "no g++ on this machine: the native kernels cannot be built (ATen's path runs instead)"
needs_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason=NO_COMPILER)


@needs_compiler
def test_library_builds_where_a_compiler_exists():
    assert cpu_native.library() is not None


def _jagged(kv_len, q_len, heads, dh, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_k, n_q = sum(kv_len), sum(q_len or kv_len)
    q, k, v = (rand((n, heads, dh), torch.float32, "cpu", gen) for n in (n_q, n_k, n_k))
    grad = torch.randn(n_q, heads, dh, generator=gen)
    return [q, k, v], offsets(kv_len), (offsets(q_len) if q_len else None), grad


def _run_jagged(inputs, kv_off, q_off, grad, backend):
    q, k, v = inputs
    return run_with_grads(lambda: jagged_causal_attention(q, k, v, kv_off, q_off, backend=backend), inputs, grad)


@needs_compiler
@pytest.mark.parametrize("subset", [False, True])
@pytest.mark.parametrize("heads,dh", [(4, 16), (2, 48)])
def test_jagged_long_and_heavy_tailed_match_reference(subset, heads, dh):
    """Lengths 0 .. 300: sequences spanning several 64-key blocks and several 128-row forward tasks."""
    kv_len = np.minimum(np.random.default_rng(7).lognormal(np.log(20), 1.3, 24).astype(int), 300).tolist()
    kv_len += [0, 1, 300, 129, 64, 65]
    q_len = [min(x, 1 + i % 5) if i % 3 else x for i, x in enumerate(kv_len)] if subset else None
    args = _jagged(kv_len, q_len, heads, dh)
    assert cpu_native.supports(*args[0])
    ref, got = _run_jagged(*args, "reference"), _run_jagged(*args, "torch")
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(g, r, torch.float32, f"native-jagged/{name}")


def _prefix(p_len, c_len, n_tok, heads, dh, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_c, n_p = sum(c_len), sum(p_len)
    q, k, v = (rand((n_c, n_tok, heads, dh), torch.float32, "cpu", gen) for _ in range(3))
    pk, pv = (rand((n_p, heads, dh), torch.float32, "cpu", gen) for _ in range(2))
    grad = torch.randn(n_c, n_tok, heads, dh, generator=gen)
    return [q, k, v, pk, pv], offsets(p_len), offsets(c_len), grad


def _run_prefix(inputs, po, co, grad, backend):
    return run_with_grads(lambda: candidate_prefix_attention(*inputs, po, co, backend=backend), inputs, grad)


@pytest.mark.parametrize("n_tok", [1, 4])
def test_candidate_prefix_many_candidates_and_long_prefixes_match_reference(n_tok):
    """40 candidates of one request (three 16-candidate tasks), prefixes of 0 .. 200, requests without candidates."""
    p_len, c_len = [200, 0, 65, 3, 0, 130], [40, 2, 17, 0, 0, 5]
    args = _prefix(p_len, c_len, n_tok, 4, 16)
    ref, got = _run_prefix(*args, "reference"), _run_prefix(*args, "torch")
    for name, g, r in zip(("out", "dq", "dk", "dv", "dpk", "dpv"), got, ref):
        assert_close(g, r, torch.float32, f"native-prefix/N={n_tok}/{name}")


def test_non_finite_inputs_stay_in_their_sequence_and_request():
    inputs, kv_off, q_off, grad = _jagged([6, 70, 2, 5], None, 2, 16, seed=3)
    with torch.no_grad():
        inputs[1][0, 0, 0] = inputs[2][1, 1, 2] = float("nan")
    ref, got = _run_jagged(inputs, kv_off, q_off, grad, "reference"), _run_jagged(inputs, kv_off, q_off, grad, "torch")
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(without_rows(g, slice(0, 6)), without_rows(r, slice(0, 6)), torch.float32, f"nan-jagged/{name}")
    inputs, po, co, grad = _prefix([5, 3, 4], [2, 3, 1], 3, 2, 16, seed=4)
    with torch.no_grad():
        inputs[3][0, 1, 3] = float("nan")
    ref, got = _run_prefix(inputs, po, co, grad, "reference"), _run_prefix(inputs, po, co, grad, "torch")
    bad = (slice(0, 2),) * 4 + (slice(0, 5),) * 2
    for name, g, r, b in zip(("out", "dq", "dk", "dv", "dpk", "dpv"), got, ref, bad):
        assert_close(without_rows(g, b), without_rows(r, b), torch.float32, f"nan-prefix/{name}")


def test_results_do_not_depend_on_the_thread_count():
    """Every (sequence, head) task is computed by one thread in a fixed order: bitwise equal for 1 and 2 threads."""
    before = torch.get_num_threads()
    args = _jagged([90, 3, 150, 0, 40], None, 4, 16)
    pargs = _prefix([80, 0, 20], [20, 3, 5], 4, 4, 16)
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_run_jagged(*args, "torch") + _run_prefix(*pargs, "torch"))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_compiler
def test_calls_the_native_kernels_do_not_take_run_the_aten_path(monkeypatch):
    """bf16 and head sizes that are not built go to the chunked ATen path (still correct)."""
    q = torch.zeros(3, 2, 16)
    assert cpu_native.supports(q)
    assert not cpu_native.supports(q.bfloat16()) and not cpu_native.supports(torch.zeros(3, 2, 8))
    monkeypatch.setattr(cpu_native, "jagged_fwd", None)  # any native call would now fail
    args = _jagged([9, 4], None, 2, 8)
    for name, g, r in zip(("out", "dq", "dk", "dv"), _run_jagged(*args, "torch"), _run_jagged(*args, "reference")):
        assert_close(g, r, torch.float32, f"aten-d8/{name}")


def test_switch_off_by_environment(monkeypatch):
    monkeypatch.setenv("RECSYS_NATIVE_ATTENTION", "0")
    cpu_native.library.cache_clear()
    try:
        assert cpu_native.library() is None and not ta._native(torch.zeros(3, 2, 16))
    finally:
        monkeypatch.delenv("RECSYS_NATIVE_ATTENTION")
        cpu_native.library.cache_clear()


@pytest.mark.parametrize("breakage", ["compiler_fails", "cache_unwritable"])
def test_a_failed_build_says_why_and_falls_back_to_aten(breakage, monkeypatch, tmp_path, capfd):
    """A compiler that fails or a cache folder that cannot be created: one line on stderr, ``library()`` is None,
    the torch backend still gives the reference's results (ATen's path)."""
    if breakage == "compiler_fails":
        monkeypatch.setenv("CXX", "false")  # exits 1 without output
        monkeypatch.setenv("RECSYS_KERNEL_CACHE", str(tmp_path / "cache"))
    else:
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("RECSYS_KERNEL_CACHE", str(tmp_path / "file" / "cache"))  # below a regular file
    cpu_native.library.cache_clear()
    try:
        assert cpu_native.library() is None
        assert "small-head CPU attention kernels unavailable" in capfd.readouterr().err
        args = _jagged([9, 4], None, 2, 16)
        for name, g, r in zip(("out", "dq", "dk", "dv"), _run_jagged(*args, "torch"), _run_jagged(*args, "reference")):
            assert_close(g, r, torch.float32, f"fallback/{name}")
    finally:
        monkeypatch.undo()
        cpu_native.library.cache_clear()
