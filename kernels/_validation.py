"""Shape / offset checks shared by the attention ops (one host sync to read offsets)."""

from __future__ import annotations

import torch


def _check_offsets(name: str, offsets: torch.Tensor, total: int) -> list[int]:
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{name} must be a 1-D tensor of B+1 offsets, got shape {tuple(offsets.shape)}")
    if offsets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be int64 (or int32), got {offsets.dtype}")
    offs = offsets.tolist()  # host sync: lengths decide grid sizes / padding
    if offs[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {offs[0]}")
    if any(b < a for a, b in zip(offs[:-1], offs[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {offs}")
    if offs[-1] != total:
        raise ValueError(f"{name}[-1] = {offs[-1]} but the jagged tensor has {total} rows")
    return offs


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ndim: int, what: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != ndim:
            raise ValueError(f"{what}: {name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{what}: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[-2:] != k.shape[-2:]:
        raise ValueError(f"{what}: q and k disagree on [H, Dh]: {tuple(q.shape)} vs {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{what}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{what}: dtype {q.dtype} not supported (fp32 / fp16 / bf16)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{what}: q, k, v are on different devices")


def check_jagged_causal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_offsets: torch.Tensor,
    q_offsets: torch.Tensor | None,
) -> tuple[list[int], list[int]]:
    """Validate jagged-causal inputs; return (kv_offsets, q_offsets) as Python lists."""
    _check_heads(q, k, v, 3, "jagged_causal_attention")
    kv = _check_offsets("kv_offsets", kv_offsets, k.shape[0])
    if q_offsets is None:
        if q.shape[0] != k.shape[0]:
            raise ValueError(
                f"q_offsets=None means every position queries, so q must have {k.shape[0]} rows "
                f"like k, got {q.shape[0]}"
            )
        return kv, kv
    qo = _check_offsets("q_offsets", q_offsets, q.shape[0])
    if len(qo) != len(kv):
        raise ValueError(f"q_offsets has {len(qo) - 1} sequences but kv_offsets has {len(kv) - 1}")
    for i in range(len(kv) - 1):
        q_i, l_i = qo[i + 1] - qo[i], kv[i + 1] - kv[i]
        if q_i > l_i:
            raise ValueError(f"sequence {i} has q_i = {q_i} queries but only L_i = {l_i} keys (need q_i <= L_i)")
    return kv, qo


def check_candidate_prefix(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_offsets: torch.Tensor,
    cand_offsets: torch.Tensor,
) -> tuple[list[int], list[int]]:
    """Validate candidate-prefix inputs; return (prefix_offsets, cand_offsets) as Python lists."""
    _check_heads(q, k, v, 4, "candidate_prefix_attention")
    if q.shape != k.shape:
        raise ValueError(f"candidate_prefix_attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ")
    _check_heads(prefix_k, prefix_k, prefix_v, 3, "candidate_prefix_attention (prefix)")
    if prefix_k.shape[-2:] != q.shape[-2:]:
        raise ValueError(f"prefix_k [H, Dh] {tuple(prefix_k.shape[-2:])} != q [H, Dh] {tuple(q.shape[-2:])}")
    if prefix_k.dtype != q.dtype or prefix_k.device != q.device:
        raise ValueError("prefix_k/prefix_v must match q in dtype and device")
    po = _check_offsets("prefix_offsets", prefix_offsets, prefix_k.shape[0])
    co = _check_offsets("cand_offsets", cand_offsets, q.shape[0])
    if len(po) != len(co):
        raise ValueError(f"prefix_offsets has {len(po) - 1} requests but cand_offsets has {len(co) - 1}")
    return po, co
