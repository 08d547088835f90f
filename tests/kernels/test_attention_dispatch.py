"""Dispatch, validation errors, custom-op registration and torch.compile for both attention ops."""

from __future__ import annotations

import pytest
import torch
from attention_cases import INTERPRETER, offsets

from kernels import AttentionBackend, candidate_prefix_attention, jagged_causal_attention
from kernels.backend import resolve_backend


def _jagged(lengths=(3, 0, 5), q_lengths=None, heads=2, dh=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    n_k = sum(lengths)
    n_q = n_k if q_lengths is None else sum(q_lengths)
    q = torch.randn(n_q, heads, dh, generator=gen, dtype=dtype)
    k = torch.randn(n_k, heads, dh, generator=gen, dtype=dtype)
    v = torch.randn(n_k, heads, dh, generator=gen, dtype=dtype)
    return q, k, v, offsets(list(lengths)), None if q_lengths is None else offsets(list(q_lengths))


def _candidates(p_len=(4, 0), c_len=(2, 3), n_tok=3, heads=2, dh=16):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(c_len), n_tok, heads, dh, generator=gen) for _ in range(3))
    pk, pv = (torch.randn(sum(p_len), heads, dh, generator=gen) for _ in range(2))
    return q, k, v, pk, pv, offsets(list(p_len)), offsets(list(c_len))


# ---------------------------------------------------------------------------------------------
# backend resolution and errors
# ---------------------------------------------------------------------------------------------
def test_backend_enum_values():
    assert [b.value for b in AttentionBackend] == ["reference", "torch", "triton", "auto"]
    assert AttentionBackend("torch") is AttentionBackend.TORCH


def test_auto_resolves_to_torch_on_cpu():
    assert resolve_backend("auto", torch.zeros(1)) is AttentionBackend.TORCH


@pytest.mark.parametrize("op", ["jagged", "candidates"])
def test_unknown_backend_names_valid_ones(op):
    args = _jagged() if op == "jagged" else _candidates()
    fn = jagged_causal_attention if op == "jagged" else candidate_prefix_attention
    with pytest.raises(ValueError, match="'reference', 'torch', 'triton', 'auto'"):
        fn(*args, backend="cuda_magic")


@pytest.mark.parametrize("op", ["jagged", "candidates"])
def test_triton_on_cpu_without_interpreter_raises(op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = _jagged() if op == "jagged" else _candidates()
    fn = jagged_causal_attention if op == "jagged" else candidate_prefix_attention
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fn(*args, backend="triton")


def test_q_longer_than_kv_raises():
    q, k, v, kv_off, _ = _jagged(lengths=(3, 2), q_lengths=(3, 3))
    q_off = offsets([3, 3])
    with pytest.raises(ValueError, match="sequence 1 has q_i = 3 queries but only L_i = 2 keys"):
        jagged_causal_attention(q, k, v, kv_off, q_off, backend="torch")


def test_mismatched_offsets_raise():
    q, k, v, kv_off, _ = _jagged(lengths=(3, 2))
    with pytest.raises(ValueError, match=r"kv_offsets\[-1\] = 4 but the jagged tensor has 5 rows"):
        jagged_causal_attention(q, k, v, offsets([3, 1]), backend="torch")
    with pytest.raises(ValueError, match="q_offsets has 1 sequences but kv_offsets has 2"):
        jagged_causal_attention(q[:2], k, v, kv_off, offsets([2]), backend="torch")
    with pytest.raises(ValueError, match="q must have 5 rows"):
        jagged_causal_attention(q[:2], k, v, kv_off, backend="torch")
    with pytest.raises(ValueError, match="non-decreasing"):
        jagged_causal_attention(q, k, v, torch.tensor([0, 4, 3, 5]), backend="torch")
    q, k, v, pk, pv, p_off, c_off = _candidates()
    with pytest.raises(ValueError, match="prefix_offsets has 1 requests but cand_offsets has 2"):
        candidate_prefix_attention(q, k, v, pk, pv, torch.tensor([0, 4]), c_off, backend="torch")
    with pytest.raises(ValueError, match=r"cand_offsets\[-1\] = 4 but the jagged tensor has 5 rows"):
        candidate_prefix_attention(q, k, v, pk, pv, p_off, offsets([2, 2]), backend="torch")


def test_dtype_and_shape_errors():
    q, k, v, kv_off, _ = _jagged()
    with pytest.raises(ValueError, match="dtypes differ"):
        jagged_causal_attention(q, k.double(), v, kv_off, backend="torch")
    with pytest.raises(ValueError, match="must have 3 dims"):
        jagged_causal_attention(q[None], k, v, kv_off, backend="torch")


def test_empty_batch_and_all_empty_sequences():
    for lengths in ([0, 0], []):
        q, k, v, kv_off, _ = _jagged(lengths=tuple(lengths))
        for backend in ("reference", "torch"):
            out = jagged_causal_attention(q, k, v, kv_off, backend=backend)
            assert out.shape == (0, 2, 16)


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------
def _require_grad(args):
    return tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def test_opcheck_jagged_torch():
    q, k, v, kv_off, q_off = _jagged(lengths=(3, 0, 5), q_lengths=(2, 0, 5))
    op = torch.ops.recsys.jagged_causal_attention_torch.default
    torch.library.opcheck(op, _require_grad((q, k, v, kv_off, q_off, 0.25)))
    q, k, v, kv_off, _ = _jagged(lengths=(3, 0, 5))
    torch.library.opcheck(op, (*_require_grad((q, k, v)), kv_off, None, 0.25))


def test_opcheck_candidates_torch():
    op = torch.ops.recsys.candidate_prefix_attention_torch.default
    torch.library.opcheck(op, (*_require_grad(_candidates()), 0.25))


@pytest.mark.skipif(not INTERPRETER, reason="Triton opcheck runs under the interpreter here")
def test_opcheck_triton_ops():
    q, k, v, kv_off, q_off = _jagged(lengths=(3, 0, 5), q_lengths=(2, 0, 5))
    torch.library.opcheck(
        torch.ops.recsys.jagged_causal_attention_triton.default, _require_grad((q, k, v, kv_off, q_off, 0.25))
    )
    torch.library.opcheck(
        torch.ops.recsys.candidate_prefix_attention_triton.default, (*_require_grad(_candidates()), 0.25)
    )


def test_fake_tensor_shapes():
    """The ops trace under FakeTensorMode without touching data (what torch.compile relies on)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, kv_off, q_off = _jagged(lengths=(3, 0, 5), q_lengths=(2, 0, 5))
    cq, ck, cv, pk, pv, p_off, c_off = _candidates()
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fq, fk, fv, fkv, fqo = (mode.from_tensor(t) for t in (q, k, v, kv_off, q_off))
        out, lse = torch.ops.recsys.jagged_causal_attention_torch(fq, fk, fv, fkv, fqo, 0.25)
        assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (q.shape[1], q.shape[0])
        out, lse = torch.ops.recsys.jagged_causal_attention_triton(fq, fk, fv, fkv, fqo, 0.25)
        assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
        fc = [mode.from_tensor(t) for t in (cq, ck, cv, pk, pv, p_off, c_off)]
        out, lse = torch.ops.recsys.candidate_prefix_attention_torch(*fc, 0.25)
        assert out.shape == cq.shape and lse.shape == (cq.shape[2], cq.shape[0] * cq.shape[1])


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """One compiled call (inductor, fullgraph=False) through the custom op vs eager, fwd + bwd."""
    q, k, v, kv_off, q_off = _jagged(lengths=(5, 1, 7), q_lengths=(2, 1, 7))
    w = torch.randn(16, 16)

    def block(q, k, v):
        out = jagged_causal_attention(q @ w, k, v, kv_off, q_off, backend="torch")
        return (out.float() ** 2).sum()

    grads = []
    for fn in (block, torch.compile(block, fullgraph=False)):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        loss = fn(qq, kk, vv)
        grads.append((loss.detach(), *torch.autograd.grad(loss, (qq, kk, vv))))
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)

    # The custom op itself is one graph node: a direct call compiles with fullgraph=True.
    direct = torch.compile(
        lambda q, k, v: torch.ops.recsys.jagged_causal_attention_torch(q, k, v, kv_off, q_off, 0.25)[0],
        fullgraph=True,
    )
    torch.testing.assert_close(
        direct(q, k, v), jagged_causal_attention(q, k, v, kv_off, q_off, scale=0.25, backend="reference")
    )


# ---------------------------------------------------------------------------------------------
# Triton autotune prune filter (pure Python; the autotuner itself only runs on a GPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not INTERPRETER, reason="imports Triton kernels; covered by the CUDA tests otherwise")
def test_autotune_prune_filter():
    from kernels.triton_attention_common import hopper_configs, make_prune

    configs = hopper_configs()
    assert len(configs) == 24
    prune = make_prune("Q", "MAX_Q", "MAX_K", streamed="N")
    fp16 = {"Q": torch.empty(0, dtype=torch.float16)}
    # short query side: no 128-row query tiles
    kept = prune(configs, fp16, MAX_Q=64, MAX_K=4096, BLOCK_D=64)
    assert kept and all(c.kwargs["BLOCK_M"] == 64 for c in kept)
    # everything shorter than the smallest tile: the smallest config survives
    kept = prune(configs, fp16, MAX_Q=16, MAX_K=16, BLOCK_D=64)
    assert len(kept) == 1 and kept[0].kwargs == {"BLOCK_M": 64, "BLOCK_N": 64}
    # shared memory: fp32, Dh = 128: deep pipelines of 128-row tiles exceed Hopper's 227 KiB
    fp32 = {"Q": torch.empty(0, dtype=torch.float32)}
    kept = prune(configs, fp32, MAX_Q=4096, MAX_K=4096, BLOCK_D=128)
    assert all((c.kwargs["BLOCK_M"] + c.num_stages * 2 * c.kwargs["BLOCK_N"]) * 128 * 4 <= 227 * 1024 for c in kept)
    assert 0 < len(kept) < len(configs)


@pytest.mark.skipif(not INTERPRETER, reason="imports Triton kernels; covered by the CUDA tests otherwise")
def test_autotune_space_from_environment(monkeypatch):
    from kernels.triton_attention_common import CONFIGS_ENV, hopper_configs, parse_config_space

    monkeypatch.setenv(CONFIGS_ENV, " 128x64x4x3, 64x64x8x2 ")
    configs = hopper_configs()
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs] == [
        (128, 64, 4, 3), (64, 64, 8, 2)]
    monkeypatch.setenv(CONFIGS_ENV, "")
    assert len(hopper_configs()) == 24
    for bad in ("128x64x4", "128x64x4x3,", "96x64x4x3", "64x64x3x2", "64x64x4x0", "64x64x4xs"):
        with pytest.raises(ValueError, match=CONFIGS_ENV):
            parse_config_space(bad)


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    """Real Triton compiler (not the interpreter) down to an sm_90 cubin; no GPU needed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("triton_aot_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "compiled 22 kernel variants for sm_90" in proc.stdout
