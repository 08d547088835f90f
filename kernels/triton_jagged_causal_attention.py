"""Triton kernels for jagged causal attention with query subsets (forward + FA2-style backward).

Layout: ``q [sum q_i, H, Dh]``, ``k, v [sum L_i, H, Dh]``, offsets ``[B+1]``. Query j of sequence i
sits at key position ``p = (L_i - q_i) + j`` (bottom-right-aligned causal mask).

Kernels (grid axis 1 is always ``B * H``):
- ``_fwd_kernel``      grid ``(cdiv(max q_i, BLOCK_M), B*H)``: one query tile; streams key tiles
  ``[0, n_full)`` without any mask (visible to every row of the tile), then the diagonal tiles
  ``[n_full, p_last + 1)`` with the causal mask; tiles past the last row's position are skipped.
  Saves ``lse`` (base 2) for the backward.
- ``attn_bwd_preprocess_kernel`` (common): ``delta = rowsum(dO * O)``.
- ``_bwd_dkdv_kernel`` grid ``(cdiv(max L_i, BLOCK_N), B*H)``: one key tile, streams the query
  tiles that can see it (rows ``>= t - (L_i - q_i)``): masked diagonal tiles, unmasked full tiles,
  a masked ragged tail. No atomics.
- ``_bwd_dq_kernel``   grid like the forward: dQ over the same key tiles as the forward.

Each kernel exists twice: the plain ``triton.jit`` function (used with fixed small tiles under
the interpreter) and an autotuned wrapper (Hopper configs, pruned per call by length buckets
and shared-memory estimate).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_attention_common import (
    LOG2E,
    attn_bwd_dkdv_tiles,
    attn_bwd_dq_tiles,
    attn_bwd_preprocess,
    attn_fwd_tiles,
    block_d,
    bucket,
    check_device,
    dot_flags,
    hopper_configs,
    launch,
    make_prune,
)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, q_offsets, kv_offsets,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lse_h,
    scale_log2, H, D_HEAD,
    MAX_Q, MAX_K,  # length buckets: autotune key only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start = tl.load(q_offsets + b)
    q_len = tl.load(q_offsets + b + 1) - q_start
    kv_start = tl.load(kv_offsets + b)
    kv_len = tl.load(kv_offsets + b + 1) - kv_start
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    shift = kv_len - q_len  # key position of query row 0

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D_HEAD
    q_pos = shift + offs_m
    row_mask = offs_m < q_len
    q = tl.load(
        Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )
    k_base = K + kv_start * stride_kt + h * stride_kh
    v_base = V + kv_start * stride_vt + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys [0, n_full) are visible to every row of the tile (<= the first row's position).
    n_full = (tl.minimum(shift + start_m + 1, kv_len) // BLOCK_N) * BLOCK_N
    # Keys past the last row's position are masked for the whole tile: never loaded.
    hi = tl.minimum(shift + start_m + BLOCK_M, kv_len)
    acc, l_i, m_i = attn_fwd_tiles(
        acc, l_i, m_i, q, q_pos, k_base, v_base, stride_kt, stride_vt,
        0, n_full, kv_len, 1, offs_n, offs_d, d_mask, scale_log2,
        BLOCK_N, False, True, False, DOT_IEEE, UPCAST,
    )
    acc, l_i, m_i = attn_fwd_tiles(
        acc, l_i, m_i, q, q_pos, k_base, v_base, stride_kt, stride_vt,
        n_full, hi, kv_len, 1, offs_n, offs_d, d_mask, scale_log2,
        BLOCK_N, True, True, False, DOT_IEEE, UPCAST,
    )
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only rows past q_len (never stored) can have l_i = 0
    out = acc / l_safe[:, None]
    tl.store(
        Out + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :],
    )
    tl.store(Lse + h * stride_lse_h + q_start + offs_m, m_i + tl.math.log2(l_safe), mask=row_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, q_offsets, kv_offsets,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lse_h,
    scale, scale_log2, H, D_HEAD,
    MAX_Q, MAX_K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start = tl.load(q_offsets + b)
    q_len = tl.load(q_offsets + b + 1) - q_start
    kv_start = tl.load(kv_offsets + b)
    kv_len = tl.load(kv_offsets + b + 1) - kv_start
    start_n = pid_n * BLOCK_N
    if start_n >= kv_len:
        return
    shift = kv_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D_HEAD
    kv_mask = (cols < kv_len)[:, None] & d_mask[None, :]
    k = tl.load(K + (kv_start + cols)[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + (kv_start + cols)[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    q_base = Q + q_start * stride_qt + h * stride_qh
    do_base = DO + q_start * stride_dot + h * stride_doh
    lse_base = Lse + h * stride_lse_h + q_start
    delta_base = Delta + h * stride_lse_h + q_start

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Row j sees key t iff shift + j >= t. Rows < row_lo see none of this tile (skipped);
    # rows >= row_full see all of it (no causal mask needed).
    row_lo = tl.maximum(start_n - shift, 0)
    row_full = tl.maximum(start_n + BLOCK_N - 1 - shift, 0)
    mid = tl.minimum(row_lo + tl.cdiv(row_full - row_lo, BLOCK_M) * BLOCK_M, q_len)
    full_end = mid + ((q_len - mid) // BLOCK_M) * BLOCK_M
    dk, dv = attn_bwd_dkdv_tiles(  # diagonal tiles
        dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
        row_lo, mid, q_len, shift, 1, offs_m, offs_d, d_mask, scale_log2,
        BLOCK_M, True, True, False, DOT_IEEE, UPCAST,
    )
    dk, dv = attn_bwd_dkdv_tiles(  # full tiles, no mask
        dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
        mid, full_end, q_len, shift, 1, offs_m, offs_d, d_mask, scale_log2,
        BLOCK_M, False, True, False, DOT_IEEE, UPCAST,
    )
    dk, dv = attn_bwd_dkdv_tiles(  # ragged tail (rows >= q_len masked)
        dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
        full_end, q_len, q_len, shift, 1, offs_m, offs_d, d_mask, scale_log2,
        BLOCK_M, True, True, False, DOT_IEEE, UPCAST,
    )
    tl.store(
        DK + (kv_start + cols)[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :],
        (dk * scale).to(DK.dtype.element_ty), mask=kv_mask,
    )
    tl.store(
        DV + (kv_start + cols)[:, None] * stride_dvt + h * stride_dvh + offs_d[None, :],
        dv.to(DV.dtype.element_ty), mask=kv_mask,
    )


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, q_offsets, kv_offsets,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lse_h,
    scale, scale_log2, H, D_HEAD,
    MAX_Q, MAX_K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start = tl.load(q_offsets + b)
    q_len = tl.load(q_offsets + b + 1) - q_start
    kv_start = tl.load(kv_offsets + b)
    kv_len = tl.load(kv_offsets + b + 1) - kv_start
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    shift = kv_len - q_len

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D_HEAD
    row_mask = offs_m < q_len
    ld_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=ld_mask, other=0.0)
    do = tl.load(DO + (q_start + offs_m)[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=ld_mask, other=0.0)
    lse = tl.load(Lse + h * stride_lse_h + q_start + offs_m, mask=row_mask, other=0.0)
    delta = tl.load(Delta + h * stride_lse_h + q_start + offs_m, mask=row_mask, other=0.0)
    q_pos = shift + offs_m
    k_base = K + kv_start * stride_kt + h * stride_kh
    v_base = V + kv_start * stride_vt + h * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (tl.minimum(shift + start_m + 1, kv_len) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(shift + start_m + BLOCK_M, kv_len)
    dq = attn_bwd_dq_tiles(
        dq, q, do, lse, delta, q_pos, k_base, v_base, stride_kt, stride_vt,
        0, n_full, kv_len, 1, offs_n, offs_d, d_mask, scale_log2,
        BLOCK_N, False, True, False, DOT_IEEE, UPCAST,
    )
    dq = attn_bwd_dq_tiles(
        dq, q, do, lse, delta, q_pos, k_base, v_base, stride_kt, stride_vt,
        n_full, hi, kv_len, 1, offs_n, offs_d, d_mask, scale_log2,
        BLOCK_N, True, True, False, DOT_IEEE, UPCAST,
    )
    tl.store(
        DQ + (q_start + offs_m)[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
        (dq * scale).to(DQ.dtype.element_ty), mask=ld_mask,
    )


# ----------------------------------------------------------------------------------------------
# autotuned wrappers (GPU only; the interpreter launches the plain kernels with fixed tiles)
# ----------------------------------------------------------------------------------------------
_KEY = ["MAX_Q", "MAX_K", "BLOCK_D", "DOT_IEEE"]
_fwd_kernel_tuned = triton.autotune(
    hopper_configs(), key=_KEY,
    prune_configs_by={"early_config_prune": make_prune("Q", "MAX_Q", "MAX_K", streamed="N")},
)(_fwd_kernel)
_bwd_dkdv_kernel_tuned = triton.autotune(
    hopper_configs(), key=_KEY,
    prune_configs_by={"early_config_prune": make_prune("Q", "MAX_Q", "MAX_K", streamed="M")},
)(_bwd_dkdv_kernel)
_bwd_dq_kernel_tuned = triton.autotune(
    hopper_configs(), key=_KEY,
    prune_configs_by={"early_config_prune": make_prune("Q", "MAX_Q", "MAX_K", streamed="N")},
)(_bwd_dq_kernel)


# ----------------------------------------------------------------------------------------------
# host wrappers
# ----------------------------------------------------------------------------------------------
def _prepare(q, k, kv_offsets, q_offsets):
    kv_off = kv_offsets.to(device=q.device, dtype=torch.int64).contiguous()
    q_off = kv_off if q_offsets is None else q_offsets.to(device=q.device, dtype=torch.int64).contiguous()
    n_seq = kv_off.numel() - 1
    lengths = torch.stack([q_off.diff(), kv_off.diff()]).amax(dim=1).tolist() if n_seq else [0, 0]
    return kv_off, q_off, n_seq, int(lengths[0]), int(lengths[1])  # host sync: grid sizes


def _common_kwargs(q: torch.Tensor, max_q: int, max_k: int, interpreted: bool) -> dict:
    return dict(
        MAX_Q=bucket(max_q), MAX_K=bucket(max_k), BLOCK_D=block_d(q.shape[2]),
        **dot_flags(q.dtype, interpreted),
    )


def jagged_causal_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_offsets: torch.Tensor,
    q_offsets: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``out [sum q_i, H, Dh]`` and ``lse [H, sum q_i]`` (fp32, base 2)."""
    interpreted = check_device(_fwd_kernel, q, k, v)
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1, "last dim must be contiguous"
    kv_off, q_off, n_seq, max_q, max_k = _prepare(q, k, kv_offsets, q_offsets)
    n_q, h, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((h, n_q), dtype=torch.float32, device=q.device)
    if n_q == 0:
        return out, lse
    launch(
        _fwd_kernel, _fwd_kernel_tuned,
        lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), n_seq * h),
        (
            q, k, v, out, lse, q_off, kv_off,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            scale * LOG2E, h, d,
        ),
        _common_kwargs(q, max_q, max_k, interpreted),
        interpreted,
    )
    return out, lse


def jagged_causal_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_offsets: torch.Tensor,
    q_offsets: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv)``; keys that no query sees get exact zeros."""
    interpreted = check_device(_bwd_dq_kernel, q, k, v)
    kv_off, q_off, n_seq, max_q, max_k = _prepare(q, k, kv_offsets, q_offsets)
    n_q, h, d = q.shape
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if n_q == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = attn_bwd_preprocess(out, dout)  # [H, sum q_i]
    kwargs = _common_kwargs(q, max_q, max_k, interpreted)
    strides = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1),
    )
    launch(
        _bwd_dkdv_kernel, _bwd_dkdv_kernel_tuned,
        lambda meta: (triton.cdiv(max_k, meta["BLOCK_N"]), n_seq * h),
        (
            q, k, v, dout, lse, delta, dk, dv, q_off, kv_off, *strides,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
            scale, scale * LOG2E, h, d,
        ),
        kwargs,
        interpreted,
    )
    launch(
        _bwd_dq_kernel, _bwd_dq_kernel_tuned,
        lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), n_seq * h),
        (
            q, k, v, dout, lse, delta, dq, q_off, kv_off, *strides,
            dq.stride(0), dq.stride(1), lse.stride(0),
            scale, scale * LOG2E, h, d,
        ),
        kwargs,
        interpreted,
    )
    return dq, dk, dv
