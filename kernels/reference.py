"""PyTorch references: plain masked softmax in fp32, one sequence at a time.

These are the oracles every other backend is tested against. They are written to be
obviously right, not fast: a Python loop over sequences (or requests), the full score
matrix, ``-inf`` masking, ``softmax`` in fp32, result cast back to the input dtype.

Shape legend: ``B`` sequences / requests, ``L_i`` keys of sequence i, ``q_i`` its queries,
``H`` heads, ``Dh`` head width, ``C_b`` candidates of request b, ``N`` NS tokens per candidate.
"""

from __future__ import annotations

import math

import torch


def _masked_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [..., H, M, Dh], k/v [..., H, T, Dh], visible [M, T] or broadcastable bool -> [..., H, M, Dh] fp32."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [..., H, M, T]
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v.float())


def jagged_causal_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_offsets: torch.Tensor,
    q_offsets: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Bottom-right-aligned causal attention over jagged sequences (oracle).

    Query j of sequence i sits at position ``p = L_i - q_i + j`` and sees keys ``0..p``.
    Inputs are validated by the public dispatcher, not here.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kv = kv_offsets.tolist()
    qo = kv if q_offsets is None else q_offsets.tolist()
    pieces = []
    for i in range(len(kv) - 1):
        k0, k1, q0, q1 = kv[i], kv[i + 1], qo[i], qo[i + 1]
        n_q, n_k = q1 - q0, k1 - k0
        if n_q == 0:
            continue
        pos = torch.arange(n_k - n_q, n_k, device=q.device)  # absolute query positions [q_i]
        visible = torch.arange(n_k, device=q.device)[None, :] <= pos[:, None]  # [q_i, L_i]
        o = _masked_softmax_attention(
            q[q0:q1].transpose(0, 1),  # [H, q_i, Dh]
            k[k0:k1].transpose(0, 1),  # [H, L_i, Dh]
            v[k0:k1].transpose(0, 1),
            visible,
            scale,
        )
        pieces.append(o.transpose(0, 1))  # [q_i, H, Dh]
    if not pieces:
        return q * 0  # no query rows: empty, but still part of the autograd graph
    return torch.cat(pieces, dim=0).to(q.dtype)


def candidate_prefix_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_offsets: torch.Tensor,
    cand_offsets: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """NS tokens of each candidate attend to the request's whole prefix + their own NS tokens ``<= n``.

    For request b the keys of candidate c are ``[prefix_b (L_b rows) ; NS tokens of c (N rows)]``;
    this loop builds exactly that concatenation (one copy of the prefix per candidate: fine for
    an oracle, the point the fast paths avoid).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    po, co = prefix_offsets.tolist(), cand_offsets.tolist()
    n_tok = q.shape[1]
    pieces = []
    for b in range(len(po) - 1):
        p0, p1, c0, c1 = po[b], po[b + 1], co[b], co[b + 1]
        n_c, n_p = c1 - c0, p1 - p0
        if n_c == 0:
            continue
        pk = prefix_k[p0:p1].unsqueeze(0).expand(n_c, -1, -1, -1)  # [C_b, L_b, H, Dh]
        pv = prefix_v[p0:p1].unsqueeze(0).expand(n_c, -1, -1, -1)
        keys = torch.cat([pk, k[c0:c1]], dim=1).transpose(1, 2)  # [C_b, H, L_b + N, Dh]
        vals = torch.cat([pv, v[c0:c1]], dim=1).transpose(1, 2)
        t = torch.arange(n_p + n_tok, device=q.device)
        n = torch.arange(n_tok, device=q.device)
        visible = (t[None, :] < n_p) | (t[None, :] - n_p <= n[:, None])  # [N, L_b + N]
        o = _masked_softmax_attention(q[c0:c1].transpose(1, 2), keys, vals, visible, scale)  # [C_b, H, N, Dh]
        pieces.append(o.transpose(1, 2))  # [C_b, N, H, Dh]
    if not pieces:
        return q * 0  # no query rows: empty, but still part of the autograd graph
    return torch.cat(pieces, dim=0).to(q.dtype)
