"""Jagged causal self-attention with query subsets: public function and backend dispatch.

Worked example (B = 2 sequences, H heads, query subset on the first one)::

    sequence   keys (L_i)   queries (q_i)   query positions p
    0          4            2               2, 3
    1          3            3               0, 1, 2

    kv_offsets = [0, 4, 7]      k, v: [7, H, Dh]
    q_offsets  = [0, 2, 5]      q:    [5, H, Dh]   (rows 0-1: positions 2-3 of seq 0)

Query j of sequence i sits at absolute position ``p = L_i - q_i + j`` and attends to keys
``0..p`` of sequence i (bottom-right-aligned causal mask). This is the pyramid "query
subset": only the last ``q_i`` positions emit queries. ``q_offsets=None`` means
``q_i = L_i`` (ordinary causal self-attention, q laid out like k).
"""

from __future__ import annotations

import math

import torch

from kernels._validation import check_jagged_causal
from kernels.backend import AttentionBackend, resolve_backend
from kernels.custom_ops import jagged_causal_attention_torch_op, jagged_causal_attention_triton_op
from kernels.reference import jagged_causal_attention_reference


def jagged_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_offsets: torch.Tensor,
    q_offsets: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Bottom-right-aligned causal attention over jagged sequences.

    Args:
        q: ``[sum q_i, H, Dh]`` queries (only the last ``q_i`` positions of each sequence).
        k: ``[sum L_i, H, Dh]`` keys.
        v: ``[sum L_i, H, Dh]`` values.
        kv_offsets: ``[B+1]`` int64; sequence i is rows ``kv_offsets[i]:kv_offsets[i+1]`` of k/v.
        q_offsets: ``[B+1]`` int64 or None (None: ``q_i = L_i``, q laid out like k).
        scale: softmax scale, default ``1/sqrt(Dh)``.
        backend: ``"reference" | "torch" | "triton" | "auto"`` (see ``AttentionBackend``).

    Returns:
        ``[sum q_i, H, Dh]`` in ``q.dtype`` (accumulated in fp32).

    Raises:
        ValueError: bad shapes/offsets, ``q_i > L_i``, unknown backend.
        RuntimeError: ``backend="triton"`` on CPU tensors without ``TRITON_INTERPRET=1``.
    """
    chosen = resolve_backend(backend, q, k, v)
    check_jagged_causal(q, k, v, kv_offsets, q_offsets)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if chosen is AttentionBackend.REFERENCE:
        return jagged_causal_attention_reference(q, k, v, kv_offsets, q_offsets, scale=scale)
    if chosen is AttentionBackend.TORCH:
        return jagged_causal_attention_torch_op(q, k, v, kv_offsets, q_offsets, scale)
    if chosen is AttentionBackend.TRITON:
        return jagged_causal_attention_triton_op(q, k, v, kv_offsets, q_offsets, scale)
    raise AssertionError(f"unhandled backend {chosen}")  # resolve_backend never returns AUTO
