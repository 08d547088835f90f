"""Triton kernels for candidate attention over a shared per-request prefix (forward + backward).

Layout: ``q, k, v [sum_b C_b, N, H, Dh]`` are viewed as rows ``[sum_b C_b * N, H, Dh]``: request b
owns rows ``[C_start_b * N, C_end_b * N)``, and local row ``r`` is NS token ``r % N`` of the
request's candidate ``r // N``. ``prefix_k, prefix_v [sum_b L_b, H, Dh]``.

Kernels (grid axis 1 is ``B * H``):
- ``_fwd_kernel``  grid ``(cdiv(max_b C_b * N, BLOCK_M), B*H)``: a tile of BLOCK_M query rows
  (``~BLOCK_M / N`` candidates of one request, one head). Phase 1 streams the request's prefix K/V
  tiles once for all those candidates (every row sees every prefix key: no mask except the
  ragged last tile). Phase 2 streams only the own-token keys of the candidates in the tile,
  rows ``[first row of its first candidate, end of tile)``, under a block-diagonal causal mask
  (same candidate, token ``<= n``): candidate-by-candidate tiles outside that window are never
  visited.
- ``_bwd_dq_kernel``          same grid and phases as the forward.
- ``_bwd_dkdv_own_kernel``    grid ``(cdiv(max_b C_b * N, BLOCK_N), B*H)``: own-token keys; streams
  the query rows of the same candidates (``[start_n, end of the last candidate of the tile)``).
- ``_bwd_dkdv_prefix_kernel`` grid ``(cdiv(max_b L_b, BLOCK_N), B*H)``: one prefix tile; streams
  all ``C_b * N`` query rows of the request (the prefix gradient sums over candidates; no atomics).
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
    Q, K, V, PK, PV, Out, Lse, prefix_offsets, cand_offsets,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh,
    stride_pkr, stride_pkh, stride_pvr, stride_pvh, stride_or, stride_oh, stride_lse_h,
    scale_log2, H, N_TOK, D_HEAD,
    MAX_ROWS, MAX_PREFIX,  # length buckets: autotune key only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    row_start = tl.load(cand_offsets + b) * N_TOK
    n_rows = tl.load(cand_offsets + b + 1) * N_TOK - row_start
    p_start = tl.load(prefix_offsets + b)
    p_len = tl.load(prefix_offsets + b + 1) - p_start
    start_m = pid_m * BLOCK_M
    if start_m >= n_rows:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)  # local rows = candidate * N + token
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D_HEAD
    row_mask = offs_m < n_rows
    q = tl.load(
        Q + (row_start + offs_m)[:, None] * stride_qr + h * stride_qh + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Phase 1: shared prefix, each K/V tile loaded once for all candidates of the tile.
    pk_base = PK + p_start * stride_pkr + h * stride_pkh
    pv_base = PV + p_start * stride_pvr + h * stride_pvh
    p_full = (p_len // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = attn_fwd_tiles(
        acc, l_i, m_i, q, offs_m, pk_base, pv_base, stride_pkr, stride_pvr,
        0, p_full, p_len, 1, offs_n, offs_d, d_mask, scale_log2,
        BLOCK_N, False, False, False, DOT_IEEE, UPCAST,
    )
    acc, l_i, m_i = attn_fwd_tiles(
        acc, l_i, m_i, q, offs_m, pk_base, pv_base, stride_pkr, stride_pvr,
        p_full, p_len, p_len, 1, offs_n, offs_d, d_mask, scale_log2,
        BLOCK_N, True, False, False, DOT_IEEE, UPCAST,
    )
    # Phase 2: own NS tokens of the candidates in this tile, block-diagonal causal.
    k_base = K + row_start * stride_kr + h * stride_kh
    v_base = V + row_start * stride_vr + h * stride_vh
    own_lo = (start_m // N_TOK) * N_TOK
    own_hi = tl.minimum(start_m + BLOCK_M, n_rows)
    acc, l_i, m_i = attn_fwd_tiles(
        acc, l_i, m_i, q, offs_m, k_base, v_base, stride_kr, stride_vr,
        own_lo, own_hi, n_rows, N_TOK, offs_n, offs_d, d_mask, scale_log2,
        BLOCK_N, True, True, True, DOT_IEEE, UPCAST,
    )
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only rows past n_rows (never stored) can have l_i = 0
    tl.store(
        Out + (row_start + offs_m)[:, None] * stride_or + h * stride_oh + offs_d[None, :],
        (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :],
    )
    tl.store(Lse + h * stride_lse_h + row_start + offs_m, m_i + tl.math.log2(l_safe), mask=row_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, DO, Lse, Delta, DQ, prefix_offsets, cand_offsets,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh,
    stride_pkr, stride_pkh, stride_pvr, stride_pvh, stride_dor, stride_doh, stride_dqr, stride_dqh,
    stride_lse_h,
    scale, scale_log2, H, N_TOK, D_HEAD,
    MAX_ROWS, MAX_PREFIX,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    row_start = tl.load(cand_offsets + b) * N_TOK
    n_rows = tl.load(cand_offsets + b + 1) * N_TOK - row_start
    p_start = tl.load(prefix_offsets + b)
    p_len = tl.load(prefix_offsets + b + 1) - p_start
    start_m = pid_m * BLOCK_M
    if start_m >= n_rows:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D_HEAD
    row_mask = offs_m < n_rows
    ld_mask = row_mask[:, None] & d_mask[None, :]
    rows = row_start + offs_m
    q = tl.load(Q + rows[:, None] * stride_qr + h * stride_qh + offs_d[None, :], mask=ld_mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dor + h * stride_doh + offs_d[None, :], mask=ld_mask, other=0.0)
    lse = tl.load(Lse + h * stride_lse_h + rows, mask=row_mask, other=0.0)
    delta = tl.load(Delta + h * stride_lse_h + rows, mask=row_mask, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    pk_base = PK + p_start * stride_pkr + h * stride_pkh
    pv_base = PV + p_start * stride_pvr + h * stride_pvh
    p_full = (p_len // BLOCK_N) * BLOCK_N
    dq = attn_bwd_dq_tiles(
        dq, q, do, lse, delta, offs_m, pk_base, pv_base, stride_pkr, stride_pvr,
        0, p_full, p_len, 1, offs_n, offs_d, d_mask, scale_log2,
        BLOCK_N, False, False, False, DOT_IEEE, UPCAST,
    )
    dq = attn_bwd_dq_tiles(
        dq, q, do, lse, delta, offs_m, pk_base, pv_base, stride_pkr, stride_pvr,
        p_full, p_len, p_len, 1, offs_n, offs_d, d_mask, scale_log2,
        BLOCK_N, True, False, False, DOT_IEEE, UPCAST,
    )
    k_base = K + row_start * stride_kr + h * stride_kh
    v_base = V + row_start * stride_vr + h * stride_vh
    own_lo = (start_m // N_TOK) * N_TOK
    own_hi = tl.minimum(start_m + BLOCK_M, n_rows)
    dq = attn_bwd_dq_tiles(
        dq, q, do, lse, delta, offs_m, k_base, v_base, stride_kr, stride_vr,
        own_lo, own_hi, n_rows, N_TOK, offs_n, offs_d, d_mask, scale_log2,
        BLOCK_N, True, True, True, DOT_IEEE, UPCAST,
    )
    tl.store(
        DQ + rows[:, None] * stride_dqr + h * stride_dqh + offs_d[None, :],
        (dq * scale).to(DQ.dtype.element_ty), mask=ld_mask,
    )


@triton.jit
def _bwd_dkdv_own_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, cand_offsets,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh, stride_dor, stride_doh,
    stride_dkr, stride_dkh, stride_dvr, stride_dvh, stride_lse_h,
    scale, scale_log2, H, N_TOK, D_HEAD,
    MAX_ROWS, MAX_PREFIX,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    row_start = tl.load(cand_offsets + b) * N_TOK
    n_rows = tl.load(cand_offsets + b + 1) * N_TOK - row_start
    start_n = pid_n * BLOCK_N
    if start_n >= n_rows:
        return

    offs_m = tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)  # local key rows (same numbering as query rows)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D_HEAD
    kv_mask = (cols < n_rows)[:, None] & d_mask[None, :]
    k = tl.load(K + (row_start + cols)[:, None] * stride_kr + h * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + (row_start + cols)[:, None] * stride_vr + h * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Own keys only matter to queries of the same candidate at token >= theirs.
    row_hi = tl.minimum(tl.cdiv(start_n + BLOCK_N, N_TOK) * N_TOK, n_rows)
    dk, dv = attn_bwd_dkdv_tiles(
        dk, dv, k, v, cols,
        Q + row_start * stride_qr + h * stride_qh, DO + row_start * stride_dor + h * stride_doh,
        Lse + h * stride_lse_h + row_start, Delta + h * stride_lse_h + row_start, stride_qr, stride_dor,
        start_n, row_hi, n_rows, 0, N_TOK, offs_m, offs_d, d_mask, scale_log2,
        BLOCK_M, True, True, True, DOT_IEEE, UPCAST,
    )
    tl.store(
        DK + (row_start + cols)[:, None] * stride_dkr + h * stride_dkh + offs_d[None, :],
        (dk * scale).to(DK.dtype.element_ty), mask=kv_mask,
    )
    tl.store(
        DV + (row_start + cols)[:, None] * stride_dvr + h * stride_dvh + offs_d[None, :],
        dv.to(DV.dtype.element_ty), mask=kv_mask,
    )


@triton.jit
def _bwd_dkdv_prefix_kernel(
    Q, PK, PV, DO, Lse, Delta, DPK, DPV, prefix_offsets, cand_offsets,
    stride_qr, stride_qh, stride_pkr, stride_pkh, stride_pvr, stride_pvh, stride_dor, stride_doh,
    stride_dpkr, stride_dpkh, stride_dpvr, stride_dpvh, stride_lse_h,
    scale, scale_log2, H, N_TOK, D_HEAD,
    MAX_ROWS, MAX_PREFIX,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    row_start = tl.load(cand_offsets + b) * N_TOK
    n_rows = tl.load(cand_offsets + b + 1) * N_TOK - row_start
    p_start = tl.load(prefix_offsets + b)
    p_len = tl.load(prefix_offsets + b + 1) - p_start
    start_n = pid_n * BLOCK_N
    if start_n >= p_len:
        return

    offs_m = tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D_HEAD
    kv_mask = (cols < p_len)[:, None] & d_mask[None, :]
    k = tl.load(PK + (p_start + cols)[:, None] * stride_pkr + h * stride_pkh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(PV + (p_start + cols)[:, None] * stride_pvr + h * stride_pvh + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = Q + row_start * stride_qr + h * stride_qh
    do_base = DO + row_start * stride_dor + h * stride_doh
    lse_base = Lse + h * stride_lse_h + row_start
    delta_base = Delta + h * stride_lse_h + row_start
    # Every query row of every candidate of the request sees every prefix key.
    full_end = (n_rows // BLOCK_M) * BLOCK_M
    dk, dv = attn_bwd_dkdv_tiles(
        dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, stride_qr, stride_dor,
        0, full_end, n_rows, 0, 1, offs_m, offs_d, d_mask, scale_log2,
        BLOCK_M, False, False, False, DOT_IEEE, UPCAST,
    )
    dk, dv = attn_bwd_dkdv_tiles(
        dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, stride_qr, stride_dor,
        full_end, n_rows, n_rows, 0, 1, offs_m, offs_d, d_mask, scale_log2,
        BLOCK_M, True, False, False, DOT_IEEE, UPCAST,
    )
    tl.store(
        DPK + (p_start + cols)[:, None] * stride_dpkr + h * stride_dpkh + offs_d[None, :],
        (dk * scale).to(DPK.dtype.element_ty), mask=kv_mask,
    )
    tl.store(
        DPV + (p_start + cols)[:, None] * stride_dpvr + h * stride_dpvh + offs_d[None, :],
        dv.to(DPV.dtype.element_ty), mask=kv_mask,
    )


# ----------------------------------------------------------------------------------------------
# autotuned wrappers (GPU only)
# ----------------------------------------------------------------------------------------------
_KEY = ["MAX_ROWS", "MAX_PREFIX", "BLOCK_D", "DOT_IEEE"]


def _tuned(kernel, rows_key: str, cols_key: str, streamed: str):
    return triton.autotune(
        hopper_configs(), key=_KEY,
        prune_configs_by={"early_config_prune": make_prune("Q", rows_key, cols_key, streamed)},
    )(kernel)


# Query-tile kernels stream keys (prefix, then own tokens); key-tile kernels stream query rows.
_fwd_kernel_tuned = _tuned(_fwd_kernel, "MAX_ROWS", "MAX_PREFIX", "N")
_bwd_dq_kernel_tuned = _tuned(_bwd_dq_kernel, "MAX_ROWS", "MAX_PREFIX", "N")
_bwd_dkdv_own_kernel_tuned = _tuned(_bwd_dkdv_own_kernel, "MAX_ROWS", "MAX_ROWS", "M")
_bwd_dkdv_prefix_kernel_tuned = _tuned(_bwd_dkdv_prefix_kernel, "MAX_ROWS", "MAX_PREFIX", "M")


# ----------------------------------------------------------------------------------------------
# host wrappers
# ----------------------------------------------------------------------------------------------
def _prepare(q, prefix_offsets, cand_offsets):
    p_off = prefix_offsets.to(device=q.device, dtype=torch.int64).contiguous()
    c_off = cand_offsets.to(device=q.device, dtype=torch.int64).contiguous()
    n_req = c_off.numel() - 1
    maxes = torch.stack([c_off.diff(), p_off.diff()]).amax(dim=1).tolist() if n_req else [0, 0]
    return p_off, c_off, n_req, int(maxes[0]) * q.shape[1], int(maxes[1])  # host sync: grid sizes


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[C, N, H, Dh]`` -> ``[C*N, H, Dh]`` view (inputs are contiguous)."""
    return x.view(-1, x.shape[2], x.shape[3])


def _kwargs(q: torch.Tensor, max_rows: int, max_prefix: int, interpreted: bool) -> dict:
    return dict(
        MAX_ROWS=bucket(max_rows), MAX_PREFIX=bucket(max_prefix), BLOCK_D=block_d(q.shape[3]),
        **dot_flags(q.dtype, interpreted),
    )


def candidate_prefix_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_offsets: torch.Tensor,
    cand_offsets: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``out [sum C_b, N, H, Dh]`` and ``lse [H, sum C_b * N]`` (fp32, base 2)."""
    interpreted = check_device(_fwd_kernel, q, k, v, prefix_k, prefix_v)
    p_off, c_off, n_req, max_rows, max_prefix = _prepare(q, prefix_offsets, cand_offsets)
    _, n_tok, h, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((h, q.shape[0] * n_tok), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse
    qr, kr, vr, outr = _rows(q), _rows(k), _rows(v), _rows(out)
    launch(
        _fwd_kernel, _fwd_kernel_tuned,
        lambda meta: (triton.cdiv(max_rows, meta["BLOCK_M"]), n_req * h),
        (
            qr, kr, vr, prefix_k, prefix_v, outr, lse, p_off, c_off,
            qr.stride(0), qr.stride(1), kr.stride(0), kr.stride(1), vr.stride(0), vr.stride(1),
            prefix_k.stride(0), prefix_k.stride(1), prefix_v.stride(0), prefix_v.stride(1),
            outr.stride(0), outr.stride(1), lse.stride(0),
            scale * LOG2E, h, n_tok, d,
        ),
        _kwargs(q, max_rows, max_prefix, interpreted),
        interpreted,
    )
    return out, lse


def candidate_prefix_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    prefix_offsets: torch.Tensor,
    cand_offsets: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv, dprefix_k, dprefix_v)``."""
    interpreted = check_device(_bwd_dq_kernel, q, k, v, prefix_k, prefix_v)
    p_off, c_off, n_req, max_rows, max_prefix = _prepare(q, prefix_offsets, cand_offsets)
    _, n_tok, h, d = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dpk, dpv = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)  # prefixes of C_b = 0 requests
    if q.numel() == 0:
        return dq, dk, dv, dpk, dpv
    qr, kr, vr, dor = _rows(q), _rows(k), _rows(v), _rows(dout)
    dqr, dkr, dvr = _rows(dq), _rows(dk), _rows(dv)
    delta = attn_bwd_preprocess(_rows(out), dor)  # [H, sum C_b * N]
    kwargs = _kwargs(q, max_rows, max_prefix, interpreted)
    scales = (scale, scale * LOG2E, h, n_tok, d)
    launch(
        _bwd_dq_kernel, _bwd_dq_kernel_tuned,
        lambda meta: (triton.cdiv(max_rows, meta["BLOCK_M"]), n_req * h),
        (
            qr, kr, vr, prefix_k, prefix_v, dor, lse, delta, dqr, p_off, c_off,
            qr.stride(0), qr.stride(1), kr.stride(0), kr.stride(1), vr.stride(0), vr.stride(1),
            prefix_k.stride(0), prefix_k.stride(1), prefix_v.stride(0), prefix_v.stride(1),
            dor.stride(0), dor.stride(1), dqr.stride(0), dqr.stride(1), lse.stride(0), *scales,
        ),
        kwargs,
        interpreted,
    )
    launch(
        _bwd_dkdv_own_kernel, _bwd_dkdv_own_kernel_tuned,
        lambda meta: (triton.cdiv(max_rows, meta["BLOCK_N"]), n_req * h),
        (
            qr, kr, vr, dor, lse, delta, dkr, dvr, c_off,
            qr.stride(0), qr.stride(1), kr.stride(0), kr.stride(1), vr.stride(0), vr.stride(1),
            dor.stride(0), dor.stride(1), dkr.stride(0), dkr.stride(1), dvr.stride(0), dvr.stride(1),
            lse.stride(0), *scales,
        ),
        kwargs,
        interpreted,
    )
    if max_prefix:
        launch(
            _bwd_dkdv_prefix_kernel, _bwd_dkdv_prefix_kernel_tuned,
            lambda meta: (triton.cdiv(max_prefix, meta["BLOCK_N"]), n_req * h),
            (
                qr, prefix_k, prefix_v, dor, lse, delta, dpk, dpv, p_off, c_off,
                qr.stride(0), qr.stride(1), prefix_k.stride(0), prefix_k.stride(1),
                prefix_v.stride(0), prefix_v.stride(1), dor.stride(0), dor.stride(1),
                dpk.stride(0), dpk.stride(1), dpv.stride(0), dpv.stride(1), lse.stride(0), *scales,
            ),
            kwargs,
            interpreted,
        )
    return dq, dk, dv, dpk, dpv
