"""Shared pieces of the Triton attention kernels: tile loops, the delta preprocess kernel,
autotune configs with a prune filter, launch helpers.

Conventions (both ops):
- Jagged tensors are row-major ``[rows, H, Dh]`` with unit stride on Dh; kernels receive base
  pointers plus a row stride and a head stride.
- Softmax runs in base 2: scores are multiplied by ``scale * log2(e)`` and exponentiated with
  ``exp2``; the saved log-sum-exp ``lse`` is in the same base-2 units (``P = exp2(s2 - lse)``).
- Accumulation is fp32; the P @ V and dS @ K products cast P / dS to the input dtype first
  (FlashAttention-2 practice; exact for fp32 inputs).
- fp32 inputs use ``input_precision="ieee"`` dots (no TF32) so results match the fp32 reference
  to ~1e-6; this costs Hopper throughput for fp32, which is not the production dtype.
- Under ``TRITON_INTERPRET=1`` ``tl.dot`` on bf16 operands gives wrong results (interpreter bug,
  see docs in /work/shared/design/ENVIRONMENT.md); kernels then get ``UPCAST=True`` and upcast
  both operands to fp32 before every dot. On a GPU ``UPCAST`` is always False.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

LOG2E = 1.4426950408889634

# Hopper search space: BLOCK_M/BLOCK_N in {64, 128}, num_warps {4, 8}, num_stages {2, 3, 4}.
_HOPPER_SPACE = [
    (bm, bn, w, s) for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for s in (2, 3, 4)
]
# Override of that space, read when the kernels are decorated (first import of kernels.triton_*):
# comma-separated BLOCK_MxBLOCK_NxWARPSxSTAGES, e.g. "128x64x4x3,64x64x4x2". Every config of every
# kernel is compiled on its first use, so a short list bounds compile + tuning time (a GPU
# validation window, tests); unset or empty: the full space.
CONFIGS_ENV = "RECSYS_TRITON_CONFIGS"
# Hopper has 228 KiB of shared memory per SM (227 KiB usable by one block).
_SMEM_LIMIT = 227 * 1024

# Fixed tiles under the interpreter (autotuning there would run every config on the CPU).
# Small tiles so short test sequences still span several blocks; tests may override.
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (Triton decides at decoration)."""
    while hasattr(kernel, "fn") and not isinstance(kernel, InterpretedFunction):  # unwrap Autotuner
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)


def check_device(kernel, *tensors: torch.Tensor) -> bool:
    """Raise unless the tensors' device matches how the kernels were built; return interpreted-ness."""
    interpreted = is_interpreted(kernel)
    on_cuda = all(t.is_cuda for t in tensors)
    if interpreted and on_cuda:
        raise RuntimeError(
            "Triton kernels were decorated under TRITON_INTERPRET=1 (CPU interpreter) but got CUDA "
            "tensors; unset TRITON_INTERPRET before kernels.triton_* is first imported."
        )
    if not interpreted and not on_cuda:
        raise RuntimeError(
            "Triton kernels were compiled for the GPU (TRITON_INTERPRET was not 1 when kernels.triton_* "
            "was first imported) but got CPU tensors; set TRITON_INTERPRET=1 before that import, or use "
            "backend='torch'."
        )
    return interpreted


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two, at least 16 (``tl.dot`` needs K >= 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def bucket(n: int) -> int:
    """Autotune key bucket for a length: next power of two, at least 16 (fewer re-tunes)."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def parse_config_space(spec: str) -> list[tuple[int, int, int, int]]:
    """``"128x64x4x3,64x64x4x2"`` -> ``[(128, 64, 4, 3), (64, 64, 4, 2)]`` (BLOCK_M, BLOCK_N, warps, stages).

    Raises:
        ValueError: an entry is not four ``x``-separated integers, a tile is not a power of two in
            16..256, warps not a power of two in 1..16, or stages not in 1..8.
    """
    space = []
    for item in (part.strip() for part in spec.split(",")):
        fields = item.split("x")
        if len(fields) != 4 or not all(f.isdigit() for f in fields):
            raise ValueError(f"{CONFIGS_ENV}: {item!r} is not BLOCK_MxBLOCK_NxWARPSxSTAGES (e.g. 128x64x4x3)")
        bm, bn, w, s = (int(f) for f in fields)
        pow2 = [n > 0 and n & (n - 1) == 0 for n in (bm, bn, w)]
        if not (all(pow2) and 16 <= bm <= 256 and 16 <= bn <= 256 and w <= 16 and 1 <= s <= 8):
            raise ValueError(
                f"{CONFIGS_ENV}: {item!r}: tiles must be powers of two in 16..256, warps a power of two "
                "in 1..16, stages in 1..8"
            )
        space.append((bm, bn, w, s))
    return space


def hopper_configs() -> list[triton.Config]:
    """The autotune space: ``$RECSYS_TRITON_CONFIGS`` when set, else the full Hopper space."""
    spec = os.environ.get(CONFIGS_ENV, "").strip()
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in (parse_config_space(spec) if spec else _HOPPER_SPACE)
    ]


def make_prune(ptr_arg: str, rows_key: str, cols_key: str, streamed: str):
    """Prune filter for ``triton.autotune``.

    Drops configs whose BLOCK_M exceeds the query-side length bucket ``rows_key`` or whose BLOCK_N
    exceeds the key-side bucket ``cols_key`` (tiles that would be mostly padding), and configs whose
    shared-memory estimate does not fit Hopper: the resident tile (``BLOCK_M`` or ``BLOCK_N`` rows,
    whichever is not ``streamed``) plus ``num_stages`` buffers of the two streamed operand tiles.
    Always keeps at least the smallest config.
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        elt = args[ptr_arg].element_size()
        d = args["BLOCK_D"]
        rows, cols = args[rows_key], args[cols_key]
        keep = []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            stream_rows = bn if streamed == "N" else bm
            fixed_rows = bm if streamed == "N" else bn
            smem = (fixed_rows * d + c.num_stages * 2 * stream_rows * d) * elt
            if bm <= rows and bn <= cols and smem <= _SMEM_LIMIT:
                keep.append(c)
        if not keep:
            keep = [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]
        return keep

    return prune


def launch(kernel, tuned, grid, args: tuple, kwargs: dict, interpreted: bool) -> None:
    """Launch ``tuned`` (autotuned) on a GPU, or ``kernel`` with the fixed interpreter tiles."""
    if interpreted:
        meta = dict(INTERPRETER_BLOCKS)
        kernel[grid(meta)](*args, **kwargs, **meta)
    else:
        tuned[grid](*args, **kwargs)


@functools.cache
def dot_flags(dtype: torch.dtype, interpreted: bool) -> dict:
    """``DOT_IEEE`` for fp32 inputs (no TF32); ``UPCAST`` for bf16 under the interpreter."""
    return {
        "DOT_IEEE": dtype == torch.float32,
        "UPCAST": interpreted and dtype == torch.bfloat16,
    }


# ----------------------------------------------------------------------------------------------
# jitted helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, DOT_IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with fp32 accumulation; see module docstring for the two flags."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT_IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _visible(q_pos, cols, key_limit, group, CAUSAL: tl.constexpr, GROUPED: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask: key in range, causal (key <= query position), same group."""
    vis = (cols < key_limit)[None, :] & (q_pos >= 0)[:, None]
    if CAUSAL:
        vis = vis & (cols[None, :] <= q_pos[:, None])
    if GROUPED:
        vis = vis & ((cols // group)[None, :] == (q_pos // group)[:, None])
    return vis


@triton.jit
def attn_fwd_tiles(
    acc, l_i, m_i,  # running state: [BLOCK_M, BLOCK_D] fp32, [BLOCK_M] fp32, [BLOCK_M] fp32
    q, q_pos,  # [BLOCK_M, BLOCK_D] query tile, [BLOCK_M] query positions in key coordinates
    K, V, stride_k, stride_v,  # key/value base pointers (sequence start, head) and row strides
    key_lo, key_hi, key_limit, group,  # key range to stream, number of valid keys, NS group size
    offs_n, offs_d, d_mask, scale_log2,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, GROUPED: tl.constexpr,
    DOT_IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    """Online-softmax over key tiles ``[key_lo, key_hi)``; MASKED=False skips every mask."""
    for start_n in range(key_lo, key_hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            ld_mask = (cols < key_limit)[None, :] & d_mask[:, None]
        else:
            ld_mask = d_mask[:, None]
        kT = tl.load(K + cols[None, :] * stride_k + offs_d[:, None], mask=ld_mask, other=0.0)  # [D, N]
        qk = _dot(q, kT, DOT_IEEE, UPCAST) * scale_log2  # [BLOCK_M, BLOCK_N], base-2 units
        if MASKED:
            qk = tl.where(_visible(q_pos, cols, key_limit, group, CAUSAL, GROUPED), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no visible key yet has m_new = -inf; subtracting 0 instead keeps
        # exp2(-inf - -inf) = NaN out of p and alpha (both become exactly 0 for that row).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * stride_v + offs_d[None, :], mask=tl.trans(ld_mask), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_IEEE, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_bwd_dq_tiles(
    dq, q, do, lse, delta, q_pos,  # dq [M, D] fp32; q, do [M, D]; lse, delta [M] fp32
    K, V, stride_k, stride_v,
    key_lo, key_hi, key_limit, group,
    offs_n, offs_d, d_mask, scale_log2,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, GROUPED: tl.constexpr,
    DOT_IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    """dQ += dS @ K over key tiles, with ``P = exp2(s2 - lse)``, ``dS = P * (dO V^T - delta)``."""
    for start_n in range(key_lo, key_hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            ld_mask = (cols < key_limit)[None, :] & d_mask[:, None]
        else:
            ld_mask = d_mask[:, None]
        kT = tl.load(K + cols[None, :] * stride_k + offs_d[:, None], mask=ld_mask, other=0.0)  # [D, N]
        vT = tl.load(V + cols[None, :] * stride_v + offs_d[:, None], mask=ld_mask, other=0.0)
        p = tl.math.exp2(_dot(q, kT, DOT_IEEE, UPCAST) * scale_log2 - lse[:, None])  # [M, N]
        if MASKED:
            p = tl.where(_visible(q_pos, cols, key_limit, group, CAUSAL, GROUPED), p, 0.0)
        dp = _dot(do, vT, DOT_IEEE, UPCAST)  # [M, N]
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), DOT_IEEE, UPCAST)
    return dq


@triton.jit
def attn_bwd_dkdv_tiles(
    dk, dv, k, v, cols,  # dk, dv [N, D] fp32; k, v [N, D]; cols [N] key positions
    Q, DO, LSE, DELTA, stride_q, stride_do,  # query-side base pointers; LSE/DELTA unit stride
    row_lo, row_hi, row_limit, pos_shift, group,  # query rows to stream; position = pos_shift + row
    offs_m, offs_d, d_mask, scale_log2,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, GROUPED: tl.constexpr,
    DOT_IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    """dV += P^T dO and dK += dS^T Q over query tiles (transposed formulation, FA2 style)."""
    for start_m in range(row_lo, row_hi, BLOCK_M):
        rows = start_m + offs_m
        if MASKED:
            ld_mask = (rows < row_limit)[:, None] & d_mask[None, :]
        else:
            ld_mask = d_mask[None, :]
        q = tl.load(Q + rows[:, None] * stride_q + offs_d[None, :], mask=ld_mask, other=0.0)  # [M, D]
        do = tl.load(DO + rows[:, None] * stride_do + offs_d[None, :], mask=ld_mask, other=0.0)
        lse = tl.load(LSE + rows, mask=rows < row_limit, other=0.0)
        delta = tl.load(DELTA + rows, mask=rows < row_limit, other=0.0)
        pT = tl.math.exp2(_dot(k, tl.trans(q), DOT_IEEE, UPCAST) * scale_log2 - lse[None, :])  # [N, M]
        if MASKED:
            q_pos = tl.where(rows < row_limit, pos_shift + rows, -1)  # -1: row hidden everywhere
            vis = _visible(q_pos, cols, 2147483647, group, CAUSAL, GROUPED)  # [M, N]
            pT = tl.where(tl.trans(vis), pT, 0.0)
        dv += _dot(pT.to(do.dtype), do, DOT_IEEE, UPCAST)
        dpT = _dot(v, tl.trans(do), DOT_IEEE, UPCAST)  # [N, M]
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(q.dtype), q, DOT_IEEE, UPCAST)
    return dk, dv


@triton.jit
def attn_bwd_preprocess_kernel(
    Out, DO, Delta,  # Out, DO [rows, H, Dh]; Delta [H, rows] fp32
    n_rows, stride_o_row, stride_o_h, stride_do_row, stride_do_h, stride_delta_h,
    D_HEAD,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[h, r] = sum_d O[r, h, d] * dO[r, h, d] (the rowsum term of dS = P * (dP - delta))."""
    pid_r = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (offs_d < D_HEAD)[None, :]
    o = tl.load(Out + rows[:, None] * stride_o_row + h * stride_o_h + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_do_row + h * stride_do_h + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + h * stride_delta_h + rows, delta, mask=rows < n_rows)


def attn_bwd_preprocess(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """``[rows, H, Dh]`` x2 -> delta ``[H, rows]`` fp32."""
    n_rows, h, d = out.shape
    delta = torch.empty((h, n_rows), dtype=torch.float32, device=out.device)
    if n_rows:
        block_r = 64
        attn_bwd_preprocess_kernel[(triton.cdiv(n_rows, block_r), h)](
            out, dout, delta,
            n_rows, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
            d,
            BLOCK_R=block_r, BLOCK_D=block_d(d),
        )
    return delta
