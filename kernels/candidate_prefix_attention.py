"""Candidate attention over a shared per-request prefix: public function and backend dispatch.

Worked example (B = 2 requests, N = 2 NS tokens per candidate)::

    request   prefix rows (L_b)   candidates (C_b)
    0         3                   2
    1         0                   1

    prefix_offsets = [0, 3, 3]     prefix_k, prefix_v: [3, H, Dh]
    cand_offsets   = [0, 2, 3]     q, k, v:            [3, 2, H, Dh]

NS token n of candidate c (request b) attends to all ``L_b`` prefix keys of request b and to
NS tokens ``0..n`` of candidate c itself, never to other candidates. This equals
``jagged_causal_attention`` on the concatenated sequence ``[prefix_b ; NS tokens of c]`` with
the last N positions as queries, without copying the prefix per candidate. The prefix is the
cacheable user-side state (cross-request KV cache); the NS tokens are per candidate.
"""

from __future__ import annotations

import math

import torch

from kernels._validation import check_candidate_prefix
from kernels.backend import AttentionBackend, resolve_backend
from kernels.custom_ops import candidate_prefix_attention_torch_op, candidate_prefix_attention_triton_op
from kernels.reference import candidate_prefix_attention_reference


def candidate_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_offsets: torch.Tensor,
    cand_offsets: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """NS-token attention of many candidates over their request's shared prefix.

    Args:
        q, k, v: ``[sum_b C_b, N, H, Dh]`` NS-token queries / keys / values of each candidate.
        prefix_k, prefix_v: ``[sum_b L_b, H, Dh]`` per-request shared prefix.
        prefix_offsets: ``[B+1]`` int64, request b's prefix rows.
        cand_offsets: ``[B+1]`` int64, request b's candidates are rows
            ``cand_offsets[b]:cand_offsets[b+1]`` of q/k/v.
        scale: softmax scale, default ``1/sqrt(Dh)``.
        backend: ``"reference" | "torch" | "triton" | "auto"``.

    Returns:
        ``[sum_b C_b, N, H, Dh]`` in ``q.dtype`` (accumulated in fp32).
    """
    chosen = resolve_backend(backend, q, k, v, prefix_k, prefix_v)
    check_candidate_prefix(q, k, v, prefix_k, prefix_v, prefix_offsets, cand_offsets)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    args = (q, k, v, prefix_k, prefix_v, prefix_offsets, cand_offsets)
    if chosen is AttentionBackend.REFERENCE:
        return candidate_prefix_attention_reference(*args, scale=scale)
    if chosen is AttentionBackend.TORCH:
        return candidate_prefix_attention_torch_op(*args, scale)
    if chosen is AttentionBackend.TRITON:
        return candidate_prefix_attention_triton_op(*args, scale)
    raise AssertionError(f"unhandled backend {chosen}")
