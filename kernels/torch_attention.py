"""CPU fast paths ("torch" backend) for both attention ops: forward (+ lse) and backward.

Same math as the references in ``reference.py``, batched:

- ``jagged_causal_attention_torch_{fwd,bwd}``: sequences are grouped into chunks (contiguous
  runs of sequences, or query-row blocks of one long sequence) whose padded score matrix stays
  under ``_SCORE_BUDGET`` elements; each chunk is padded with fbgemm ``jagged_to_padded_dense`` to
  the chunk's own max length (not the batch max), attended with one fused call, and unpadded with
  ``dense_to_jagged``. Chunks where every sequence queries all its positions use ``is_causal``
  (fastest CPU kernel); query subsets use an additive mask.
- ``candidate_prefix_attention_torch_{fwd,bwd}``: for each request and chunk of its candidates,
  all NS queries attend to the prefix in one fused unmasked call (the prefix is never copied per
  candidate) and to their own N tokens with small batched matmuls; the two partial softmaxes are
  merged with log-sum-exp. The backward is exact because it uses the *joint* lse and output: the
  prefix part is ``flash_bwd(dO, Q, K_prefix, V_prefix, O_joint, lse_joint)``.

The fused call on CPU is ATen's flash kernel, ``aten::_scaled_dot_product_flash_attention_for_cpu``
and its ``_backward`` (what ``F.scaled_dot_product_attention`` runs on CPU; used directly because
the backward needs the log-sum-exp that the public SDPA does not return). On other devices (the
torch backend on CUDA tensors) the same functions run explicit fp32 matmul/softmax math, which the
tests also exercise on CPU by turning ``_CPU_FLASH`` off.

These functions run inside ``torch.library`` custom ops (``kernels/custom_ops.py``), where autograd
is off, hence the explicit backward; it is tested against autograd of the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.jagged_to_padded_dense / dense_to_jagged)
import torch

# Max transient elements per chunk (see _plan_chunks: padded rows, masks, or score matrices):
# bounds memory independently of the batch size, the longest sequence and C.
_SCORE_BUDGET = 1 << 23
# Use ATen's fused CPU flash kernels for CPU tensors (tests switch this off to cover the explicit path).
_CPU_FLASH = True

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


# ----------------------------------------------------------------------------------------------
# dense attention primitive with lse: [n, H, M, Dh] x [n, H, T, Dh]
# ----------------------------------------------------------------------------------------------
def _additive(visible: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if visible is None:
        return None
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))


def _visible_or_causal(visible, is_causal, m, t, device):
    if is_causal:  # top-left causal on the padded grid
        return torch.ones(m, t, dtype=torch.bool, device=device).tril()
    return visible


def attend_fwd(q, k, v, scale: float, *, is_causal: bool = False, visible: torch.Tensor | None = None):
    """Softmax attention returning ``(out [n,H,M,Dh] in q.dtype, lse [n,H,M] fp32, natural log)``.

    ``visible`` is a boolean mask broadcastable to ``[n, H, M, T]``; every row must see >= 1 key.
    """
    if _fused(q.device):
        out, lse = _flash_fwd(q, k, v, 0.0, is_causal, attn_mask=_additive(visible, q.dtype), scale=scale)
        return out, lse
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [n, H, M, T]
    vis = _visible_or_causal(visible, is_causal, s.shape[-2], s.shape[-1], q.device)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [n, H, M]
    out = torch.matmul(torch.exp(s - lse[..., None]), v.float())
    return out.to(q.dtype), lse


def attend_bwd(dout, q, k, v, out, lse, scale: float, *, is_causal: bool = False, visible=None):
    """Backward of ``attend_fwd`` given its (or a joint) ``out`` and ``lse``: ``(dq, dk, dv)``.

    ``P = exp(s - lse)`` and ``delta = rowsum(dO * out)``: passing the output and lse of a larger
    softmax that this key set is only part of gives that part's exact contribution.
    """
    if _fused(q.device):
        return _flash_bwd(dout, q, k, v, out, lse, 0.0, is_causal, attn_mask=_additive(visible, q.dtype), scale=scale)
    qf, kf, vf, dof = q.float(), k.float(), v.float(), dout.float()
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [n, H, M, T]
    p = torch.exp(s - lse[..., None])
    vis = _visible_or_causal(visible, is_causal, s.shape[-2], s.shape[-1], q.device)
    if vis is not None:
        p = p.masked_fill(~vis, 0.0)
    delta = (dof * out.float()).sum(-1, keepdim=True)  # [n, H, M, 1]
    dv = torch.matmul(p.transpose(-1, -2), dof)
    ds = p * (torch.matmul(dof, vf.transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------------------------
# Jagged causal attention
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Chunk:
    """Rows ``q[q_lo:q_hi]`` attend within ``k[k_lo:k_hi]``; local offsets describe the sequences."""

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    q_offs: tuple[int, ...]  # [n+1], relative to q_lo
    k_offs: tuple[int, ...]  # [n+1], relative to k_lo

    @property
    def full(self) -> bool:
        """Every sequence queries all its positions (top-left causal on the padded grid is exact)."""
        return self.q_offs == self.k_offs


def _fused(device: torch.device) -> bool:
    """True when attention runs through ATen's fused CPU flash kernels (no score matrix in memory)."""
    return device.type == "cpu" and _CPU_FLASH


def _plan_chunks(
    kv: list[int], qo: list[int], heads: int, head_dim: int, fused: bool, budget: int | None = None
) -> list[_Chunk]:
    """Greedy grouping of consecutive sequences into chunks whose transient memory fits ``budget``.

    Cost of a chunk of n sequences padded to (Qmax, Lmax), in elements:
    - fused flash, full causal: ``n * Lmax * H * Dh`` (one padded tensor; no mask, no scores);
    - fused flash, query subset: ``n * Qmax * Lmax`` (the additive mask);
    - explicit math: ``n * H * Qmax * Lmax`` (score matrices).
    A sequence too large on its own is split into query-row blocks; a row block ``[j0, j1)`` of
    sequence i is itself a bottom-right-aligned query subset over keys ``0 .. L_i - q_i + j1 - 1``.
    """
    budget = _SCORE_BUDGET if budget is None else budget

    def cost(n: int, max_q: int, max_l: int, full: bool) -> int:
        if fused:
            return n * max_l * heads * head_dim if full else n * max_q * max_l
        return n * heads * max_q * max_l

    chunks: list[_Chunk] = []
    run: list[int] = []  # sequence ids of the current run
    run_q = run_l = 0
    run_full = True

    def flush() -> None:
        if run:
            i0, i1 = run[0], run[-1] + 1
            chunks.append(
                _Chunk(
                    qo[i0], qo[i1], kv[i0], kv[i1],
                    tuple(x - qo[i0] for x in qo[i0 : i1 + 1]),
                    tuple(x - kv[i0] for x in kv[i0 : i1 + 1]),
                )
            )

    for i in range(len(kv) - 1):
        n_q, n_k = qo[i + 1] - qo[i], kv[i + 1] - kv[i]
        full = n_q == n_k
        if cost(1, n_q, n_k, full) > budget:
            flush()
            run, run_q, run_l, run_full = [], 0, 0, True
            rows = max(1, budget // cost(1, 1, n_k, False))
            for j0 in range(0, n_q, rows):
                j1 = min(n_q, j0 + rows)
                n_vis = n_k - n_q + j1  # keys visible to the last row of the block
                chunks.append(_Chunk(qo[i] + j0, qo[i] + j1, kv[i], kv[i] + n_vis, (0, j1 - j0), (0, n_vis)))
            continue
        new_q, new_l, new_full = max(run_q, n_q), max(run_l, n_k), run_full and full
        if run and cost(len(run) + 1, new_q, new_l, new_full) > budget:
            flush()
            run, new_q, new_l, new_full = [], n_q, n_k, full
        run.append(i)
        run_q, run_l, run_full = new_q, new_l, new_full
    flush()
    return chunks


def _to_padded(x: torch.Tensor, offsets: torch.Tensor, max_len: int, value: float = 0.0) -> torch.Tensor:
    """Jagged ``[sum L_i, H, Dh]`` -> padded ``[B, H, max_len, Dh]`` (``value`` past L_i)."""
    n, h, d = x.shape
    b = offsets.numel() - 1
    dense = torch.ops.fbgemm.jagged_to_padded_dense(x.reshape(n, h * d), [offsets], [max_len], value)
    return dense.view(b, max_len, h, d).transpose(1, 2)  # [B, H, max_len, Dh]


def _to_jagged(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Padded ``[B, H, max_len, Dh]`` -> jagged ``[sum L_i, H, Dh]`` (padded rows dropped)."""
    b, h, m, d = x.shape
    dense = x.transpose(1, 2).reshape(b, m, h * d)  # [B, max_len, H*Dh]
    return torch.ops.fbgemm.dense_to_jagged(dense, [offsets])[0].view(-1, h, d)


def _chunk_visible(c: _Chunk, device: torch.device) -> torch.Tensor:
    """Boolean mask ``[n, 1, Qmax, Lmax]`` of a query-subset chunk; every padded query row sees key 0.

    Padded rows (j >= q_i) of an L_i = 0 sequence would see no key: softmax gives NaN there, and
    NaN * 0 leaks into dK/dV in the backward. Letting them see key 0 keeps everything finite; their
    outputs are dropped and their incoming gradient is exactly zero.
    """
    q_len = torch.tensor(c.q_offs, device=device).diff()  # [n]
    k_len = torch.tensor(c.k_offs, device=device).diff()
    j = torch.arange(int(q_len.max()), device=device)
    t = torch.arange(int(k_len.max()), device=device)
    pos = (k_len - q_len)[:, None] + j[None, :]  # [n, Qmax] absolute query positions
    visible = (t[None, None, :] <= pos[:, :, None]) & (t[None, None, :] < k_len[:, None, None])
    padded_row = j[None, :] >= q_len[:, None]  # [n, Qmax]
    return (visible | (padded_row[:, :, None] & (t[None, None, :] == 0)))[:, None]


def _chunk_mask(c: _Chunk, device) -> dict:
    # Full chunks: top-left causal on the padded grid is exact for real rows (row j < L_i never
    # sees a padded key t >= L_i > j) and every padded row sees key 0.
    return {"is_causal": True} if c.full else {"visible": _chunk_visible(c, device)}


def _pad_chunk(c: _Chunk, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    q_offs = torch.tensor(c.q_offs, device=q.device)
    k_offs = torch.tensor(c.k_offs, device=q.device)
    max_q, max_l = int(q_offs.diff().max()), int(k_offs.diff().max())
    qp = _to_padded(q[c.q_lo : c.q_hi], q_offs, max_q)  # [n, H, Qmax, Dh]
    kp = _to_padded(k[c.k_lo : c.k_hi], k_offs, max_l)  # [n, H, Lmax, Dh]
    vp = _to_padded(v[c.k_lo : c.k_hi], k_offs, max_l)
    return q_offs, k_offs, qp, kp, vp


def jagged_causal_attention_torch_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_offsets: torch.Tensor,
    q_offsets: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked padded attention. Returns ``out [sum q_i, H, Dh]`` and ``lse [H, sum q_i]`` (fp32)."""
    kv = kv_offsets.tolist()  # host sync: chunk plan
    qo = kv if q_offsets is None else q_offsets.tolist()
    out = torch.empty_like(q)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    for c in _plan_chunks(kv, qo, q.shape[1], q.shape[2], _fused(q.device)):
        if c.q_hi == c.q_lo:
            continue
        q_offs, _, qp, kp, vp = _pad_chunk(c, q, k, v)
        o, l_pad = attend_fwd(qp, kp, vp, scale, **_chunk_mask(c, q.device))  # [n,H,Qmax,Dh], [n,H,Qmax]
        out[c.q_lo : c.q_hi] = _to_jagged(o, q_offs)
        lse[:, c.q_lo : c.q_hi] = _to_jagged(l_pad[..., None], q_offs)[..., 0].T
    return out, lse


def jagged_causal_attention_torch_bwd(
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
    """Backward chunk by chunk (same chunk plan as the forward). Returns ``(dq, dk, dv)``."""
    kv = kv_offsets.tolist()
    qo = kv if q_offsets is None else q_offsets.tolist()
    dq = torch.zeros_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)  # row blocks of one sequence add up
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for c in _plan_chunks(kv, qo, q.shape[1], q.shape[2], _fused(q.device)):
        if c.q_hi == c.q_lo:
            continue
        q_offs, k_offs, qp, kp, vp = _pad_chunk(c, q, k, v)
        max_q = qp.shape[2]
        # Padded rows: dO = 0, q = 0 and lse = 0, so P = exp(0) = 1 stays finite and dS = 0 there.
        dop = _to_padded(dout[c.q_lo : c.q_hi], q_offs, max_q)
        op = _to_padded(out[c.q_lo : c.q_hi], q_offs, max_q)
        lp = _to_padded(lse[:, c.q_lo : c.q_hi].T[..., None], q_offs, max_q)[..., 0]  # [n, H, Qmax]
        dqp, dkp, dvp = attend_bwd(dop, qp, kp, vp, op, lp.contiguous(), scale, **_chunk_mask(c, q.device))
        dq[c.q_lo : c.q_hi] = _to_jagged(dqp, q_offs)
        dk[c.k_lo : c.k_hi] += _to_jagged(dkp, k_offs)
        dv[c.k_lo : c.k_hi] += _to_jagged(dvp, k_offs)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------------------------
# Candidate-prefix attention
# ----------------------------------------------------------------------------------------------
def _candidate_chunks(po: list[int], co: list[int], n_tok: int, heads: int, head_dim: int, fused: bool):
    """Yield (p0, p1, c0, c1): request b's prefix rows and one chunk of its candidates.

    Per candidate a chunk holds ``H * N * N`` own-token scores plus either ``H * N * Dh`` rows (fused
    prefix call) or ``H * N * L_b`` prefix scores (explicit math).
    """
    for b in range(len(po) - 1):
        p0, p1 = po[b], po[b + 1]
        per_cand = heads * n_tok * (n_tok + (head_dim if fused else p1 - p0))
        chunk = max(1, _SCORE_BUDGET // per_cand)
        for c0 in range(co[b], co[b + 1], chunk):
            yield p0, p1, c0, min(co[b + 1], c0 + chunk)


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """``[c, N, H, Dh]`` -> ``[1, H, c*N, Dh]`` (all NS queries of a chunk as one sequence)."""
    c, n, h, d = x.shape
    return x.reshape(c * n, h, d).transpose(0, 1)[None]


def _own_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Own-token scores ``[H, c, N, N]`` in fp32, causal within each candidate (diagonal visible)."""
    n = q.shape[1]
    s = torch.matmul(q.float().permute(2, 0, 1, 3), k.float().permute(2, 0, 3, 1)) * scale  # [H, c, N, N]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return s.masked_fill(~causal, float("-inf"))


def candidate_prefix_attention_torch_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_offsets: torch.Tensor,
    cand_offsets: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``out [sum C_b, N, H, Dh]`` and the joint ``lse [H, sum C_b * N]`` (fp32)."""
    _, n, h, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((h, q.shape[0] * n), dtype=torch.float32, device=q.device)
    for p0, p1, c0, c1 in _candidate_chunks(prefix_offsets.tolist(), cand_offsets.tolist(), n, h, d, _fused(q.device)):
        c = c1 - c0
        s_own = _own_scores(q[c0:c1], k[c0:c1], scale)  # [H, c, N, N]
        lse_own = torch.logsumexp(s_own, dim=-1).reshape(h, c * n)  # [H, c*N]
        o_own = torch.matmul(torch.exp(s_own - lse_own.view(h, c, n, 1)), v[c0:c1].float().permute(2, 0, 1, 3))
        o_own = o_own.reshape(h, c * n, d)  # [H, c*N, Dh] fp32
        if p1 > p0:
            # Every NS query of the chunk sees every prefix key: one unmasked fused call.
            pk = prefix_k[p0:p1].transpose(0, 1)[None]  # [1, H, L_b, Dh]
            pv = prefix_v[p0:p1].transpose(0, 1)[None]
            o_pre, lse_pre = attend_fwd(_rows_view(q[c0:c1]), pk, pv, scale)  # [1,H,cN,Dh], [1,H,cN]
            lse_pre = lse_pre[0]
            # softmax over [prefix ; own] from the two partial softmaxes
            l_joint = torch.logaddexp(lse_pre, lse_own)
            o = torch.exp(lse_pre - l_joint)[..., None] * o_pre[0].float()
            o = o + torch.exp(lse_own - l_joint)[..., None] * o_own
        else:
            l_joint, o = lse_own, o_own
        out[c0:c1] = o.view(h, c, n, d).permute(1, 2, 0, 3)  # [c, N, H, Dh]
        lse[:, c0 * n : c1 * n] = l_joint
    return out, lse


def candidate_prefix_attention_torch_bwd(
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
    """Backward given the joint output and lse: ``(dq, dk, dv, dprefix_k, dprefix_v)``."""
    _, n, h, d = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dpk = torch.zeros(prefix_k.shape, dtype=torch.float32, device=q.device)  # summed over candidates
    dpv = torch.zeros(prefix_v.shape, dtype=torch.float32, device=q.device)
    for p0, p1, c0, c1 in _candidate_chunks(prefix_offsets.tolist(), cand_offsets.tolist(), n, h, d, _fused(q.device)):
        c = c1 - c0
        l_joint = lse[:, c0 * n : c1 * n]  # [H, c*N]
        # own tokens: explicit math with the joint probabilities
        dof = dout[c0:c1].float().permute(2, 0, 1, 3)  # [H, c, N, Dh]
        delta = (dof * out[c0:c1].float().permute(2, 0, 1, 3)).sum(-1, keepdim=True)  # [H, c, N, 1]
        p_own = torch.exp(_own_scores(q[c0:c1], k[c0:c1], scale) - l_joint.reshape(h, c, n, 1))
        vf = v[c0:c1].float().permute(2, 0, 1, 3)
        ds = p_own * (torch.matmul(dof, vf.transpose(-1, -2)) - delta)  # [H, c, N, N]
        dq_c = torch.matmul(ds, k[c0:c1].float().permute(2, 0, 1, 3)) * scale  # [H, c, N, Dh]
        dk[c0:c1] = (torch.matmul(ds.transpose(-1, -2), q[c0:c1].float().permute(2, 0, 1, 3)) * scale).permute(1, 2, 0, 3)
        dv[c0:c1] = torch.matmul(p_own.transpose(-1, -2), dof).permute(1, 2, 0, 3)
        if p1 > p0:
            # prefix: its exact share of the joint softmax gradient, from the joint out and lse
            pk = prefix_k[p0:p1].transpose(0, 1)[None]  # [1, H, L_b, Dh]
            pv = prefix_v[p0:p1].transpose(0, 1)[None]
            dq_p, dpk_p, dpv_p = attend_bwd(
                _rows_view(dout[c0:c1]), _rows_view(q[c0:c1]), pk, pv, _rows_view(out[c0:c1]),
                l_joint[None].contiguous(), scale,
            )
            dq_c = dq_c + dq_p[0].float().view(h, c, n, d)
            dpk[p0:p1] += dpk_p[0].transpose(0, 1).float()
            dpv[p0:p1] += dpv_p[0].transpose(0, 1).float()
        dq[c0:c1] = dq_c.permute(1, 2, 0, 3)
    return dq, dk, dv, dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)
