"""CPU ("torch" backend) chunk planning: sequences visited longest first, padding bounded per chunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attention_cases import assert_close, offsets, rand, run_with_grads, without_rows

from kernels import candidate_prefix_attention, jagged_causal_attention
from kernels import torch_attention as ta


def heavy_tailed(n: int, seed: int, median: float = 12.0, cap: int = 90) -> list[int]:
    rng = np.random.default_rng(seed)
    return np.minimum(rng.lognormal(np.log(median), 1.2, n).astype(int), cap).tolist()


@pytest.mark.parametrize("subset", [False, True])
def test_length_sorted_permutation_round_trip(subset):
    kv_len = heavy_tailed(30, 0) + [0, 0]
    q_len = [min(x, 3) for x in kv_len] if subset else kv_len
    kv, qo = offsets(kv_len).tolist(), offsets(q_len).tolist()
    kv2, qo2, k_rows, q_rows = ta._length_sorted(kv, kv if not subset else qo, torch.device("cpu"))
    lens2 = np.diff(kv2).tolist()
    assert lens2 == sorted(kv_len, reverse=True)
    assert sorted(k_rows.tolist()) == list(range(kv[-1]))  # a permutation of the key rows
    assert sorted(q_rows.tolist()) == list(range(qo[-1]))
    order = sorted(range(len(kv_len)), key=lambda i: -kv_len[i])  # stable: ties keep batch order
    for j, i in enumerate(order):  # permuted sequence j = original sequence i, its rows in order
        assert k_rows[kv2[j]:kv2[j + 1]].tolist() == list(range(kv[i], kv[i + 1]))
        assert q_rows[qo2[j]:qo2[j + 1]].tolist() == list(range(qo[i], qo[i + 1]))
    sorted_offs = [0, 5, 8, 11]  # lengths 5, 3, 3: already longest first, left as is
    assert ta._length_sorted(sorted_offs, sorted_offs, torch.device("cpu"))[2] is None


@pytest.mark.parametrize("fused", [True, False], ids=["cpu_flash", "explicit_math"])
@pytest.mark.parametrize("subset", [False, True])
def test_heavy_tailed_batch_matches_reference(fused, subset, monkeypatch):
    """Many chunks over an unsorted heavy-tailed batch, forward and backward, against the reference."""
    monkeypatch.setattr(ta, "_CPU_FLASH", fused)
    kv_len = heavy_tailed(40, 1)
    q_len = [min(x, 4) for x in kv_len] if subset else None
    gen = torch.Generator().manual_seed(0)
    n_k, n_q = sum(kv_len), sum(q_len) if subset else sum(kv_len)
    q, k, v = rand((n_q, 2, 8), torch.float32, "cpu", gen), rand((n_k, 2, 8), torch.float32, "cpu", gen), \
        rand((n_k, 2, 8), torch.float32, "cpu", gen)
    grad = torch.randn(n_q, 2, 8, generator=gen)
    kv_off, q_off = offsets(kv_len), (offsets(q_len) if subset else None)
    ref = run_with_grads(lambda: jagged_causal_attention(q, k, v, kv_off, q_off, backend="reference"), [q, k, v], grad)
    got = run_with_grads(lambda: jagged_causal_attention(q, k, v, kv_off, q_off, backend="torch"), [q, k, v], grad)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(g, r, torch.float32, f"sorted/{name}")


def test_sorted_chunks_bound_padding():
    kv_len = heavy_tailed(200, 2, cap=400)
    kv, _, _, _ = ta._length_sorted(offsets(kv_len).tolist(), offsets(kv_len).tolist(), torch.device("cpu"))
    for c in ta._plan_chunks(kv, kv, 4, 16, True):
        lens = np.diff(c.k_offs)
        if len(lens) > 1:
            assert len(lens) * lens.max() <= ta._PAD_RATIO * lens.sum() + ta._PAD_SLACK


def test_candidate_segments_cover_every_candidate_once_with_bounded_padding():
    p_len = heavy_tailed(60, 3, cap=300) + [0]
    c_len = np.random.default_rng(4).integers(0, 6, len(p_len)).tolist()
    po, co = offsets(p_len).tolist(), offsets(c_len).tolist()
    chunks = ta._candidate_segments(po, co, 2, 2, budget=1 << 14)
    seen = [c for seg in chunks for (_, c0, c1) in seg for c in range(c0, c1)]
    want = [c for b in range(len(p_len)) if p_len[b] for c in range(co[b], co[b + 1])]
    assert sorted(seen) == want
    for seg in chunks:
        lens = [p_len[b] for b, _, _ in seg]
        if len(seg) > 1:
            assert len(seg) * max(lens) <= ta._PREFIX_PAD_RATIO * sum(lens) + ta._PREFIX_PAD_SLACK


def test_candidate_prefix_heavy_tailed_matches_reference():
    p_len = heavy_tailed(25, 5, cap=80)
    c_len = np.random.default_rng(6).integers(1, 4, len(p_len)).tolist()
    gen = torch.Generator().manual_seed(1)
    n_c, n_p = sum(c_len), sum(p_len)
    q, k, v = (rand((n_c, 3, 2, 8), torch.float32, "cpu", gen) for _ in range(3))
    pk, pv = (rand((n_p, 2, 8), torch.float32, "cpu", gen) for _ in range(2))
    grad = torch.randn(n_c, 3, 2, 8, generator=gen)
    po, co = offsets(p_len), offsets(c_len)
    inputs = [q, k, v, pk, pv]
    ref = run_with_grads(lambda: candidate_prefix_attention(q, k, v, pk, pv, po, co, backend="reference"), inputs, grad)
    got = run_with_grads(lambda: candidate_prefix_attention(q, k, v, pk, pv, po, co, backend="torch"), inputs, grad)
    for name, g, r in zip(("out", "dq", "dk", "dv", "dpk", "dpv"), got, ref):
        assert_close(g, r, torch.float32, f"sorted-prefix/{name}")


@pytest.mark.parametrize("fused", [True, False], ids=["cpu_flash", "explicit_math"])
@pytest.mark.parametrize("subset", [False, True])
def test_jagged_non_finite_row_stays_in_its_sequence(fused, subset, monkeypatch):
    """A NaN in the batch's first row (sequence 0) reaches no other sequence's outputs or gradients: the
    padded slots of a chunk hold copies of their own sequence's rows, never another's."""
    monkeypatch.setattr(ta, "_CPU_FLASH", fused)
    kv_len, q_len = [6, 4, 2, 5], ([2, 3, 1, 4] if subset else None)
    gen = torch.Generator().manual_seed(3)
    n_k, n_q = sum(kv_len), sum(q_len or kv_len)
    q, k, v = (rand((n, 2, 8), torch.float32, "cpu", gen) for n in (n_q, n_k, n_k))
    with torch.no_grad():
        k[0, 0, 0] = v[0, 1, 2] = float("nan")
    grad = torch.randn(n_q, 2, 8, generator=gen)
    kv_off, q_off = offsets(kv_len), (offsets(q_len) if subset else None)
    ref = run_with_grads(lambda: jagged_causal_attention(q, k, v, kv_off, q_off, backend="reference"), [q, k, v], grad)
    got = run_with_grads(lambda: jagged_causal_attention(q, k, v, kv_off, q_off, backend="torch"), [q, k, v], grad)
    bad_q, bad_k = slice(0, (q_len or kv_len)[0]), slice(0, kv_len[0])
    for name, g, r, bad in zip(("out", "dq", "dk", "dv"), got, ref, (bad_q, bad_q, bad_k, bad_k)):
        assert_close(without_rows(g, bad), without_rows(r, bad), torch.float32, f"nan-isolation/{name}")


@pytest.mark.parametrize("fused", [True, False], ids=["cpu_flash", "explicit_math"])
def test_candidate_prefix_non_finite_prefix_row_stays_in_its_request(fused, monkeypatch):
    """A NaN in request 0's first prefix row reaches no other request's candidates or prefix gradients."""
    monkeypatch.setattr(ta, "_CPU_FLASH", fused)
    p_len, c_len = [5, 3, 4, 2], [2, 3, 1, 2]
    gen = torch.Generator().manual_seed(4)
    n_c, n_p = sum(c_len), sum(p_len)
    q, k, v = (rand((n_c, 3, 2, 8), torch.float32, "cpu", gen) for _ in range(3))
    pk, pv = (rand((n_p, 2, 8), torch.float32, "cpu", gen) for _ in range(2))
    with torch.no_grad():
        pk[0, 1, 3] = float("nan")
    grad = torch.randn(n_c, 3, 2, 8, generator=gen)
    po, co = offsets(p_len), offsets(c_len)
    inputs = [q, k, v, pk, pv]
    ref = run_with_grads(lambda: candidate_prefix_attention(q, k, v, pk, pv, po, co, backend="reference"), inputs, grad)
    got = run_with_grads(lambda: candidate_prefix_attention(q, k, v, pk, pv, po, co, backend="torch"), inputs, grad)
    bad_c, bad_p = slice(0, c_len[0]), slice(0, p_len[0])
    for name, g, r, bad in zip(("out", "dq", "dk", "dv", "dpk", "dpv"), got, ref, (bad_c,) * 4 + (bad_p,) * 2):
        assert_close(without_rows(g, bad), without_rows(r, bad), torch.float32, f"nan-isolation/{name}")
