"""CPU fast paths ("torch" backend) for both attention ops: forward (+ lse) and backward.

Where ``kernels.cpu_native`` takes the call (CPU fp32, head size 16/32/48/64, the library built), each function
hands it to the small-head native kernels, which work on the jagged rows directly. Everything below is the
path for the other calls (bf16 / fp16, other head sizes, no compiler, CUDA tensors). Same math as the
references in ``reference.py``, batched:

- ``jagged_causal_attention_torch_{fwd,bwd}``: sequences are grouped into chunks (runs of
  sequences in longest-first order, ``_length_sorted``, or query-row blocks of one long sequence)
  whose transient memory stays under ``_SCORE_BUDGET`` elements and whose padding stays near its
  real rows; each chunk is gathered straight from the unsorted rows into its padded grid
  (``_pad_rows``: one row copy per slot), attended with one fused call, and its outputs are
  scattered straight back to their rows (``index_copy_`` / ``index_add_``; padded slots go to a
  scratch row). Chunks where every sequence queries all its positions use ``is_causal``
  (fastest CPU kernel); query subsets use an additive mask.
- ``candidate_prefix_attention_torch_{fwd,bwd}``: own N tokens of every candidate as one fused
  causal call over C sequences of length N; the prefix by one fused call per chunk of *many requests* (the NS rows of a
  request's candidates padded against its prefix, key padding masked; the prefix is never copied
  per candidate); the two partial softmaxes are merged with log-sum-exp. The backward is exact
  because it uses the *joint* lse and output: the prefix part is ``flash_bwd(dO, Q, K_prefix, V_prefix, O_joint, lse_joint)``, the own part
  the same over the own keys.

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

import torch

from kernels import cpu_native

# Max transient elements per chunk (see _plan_chunks: padded rows, masks, or score matrices):
# bounds memory independently of the batch size, the longest sequence and C.
_SCORE_BUDGET = 1 << 23
# A chunk stops growing when its padded key rows would exceed RATIO x its real ones + SLACK (sequences
# are visited longest first, so a chunk holds similar lengths; the slack lets short ones group). Tuned
# on the default training batch, forward + backward (bench/profile_step.py, docs/performance.md):
# jagged causal chunks (cost ~ rows^2) gain from tight chunks, candidate-prefix chunks (higher fixed
# cost per chunk) from looser ones.
_PAD_RATIO, _PAD_SLACK = 1.1, 16
_PREFIX_PAD_RATIO, _PREFIX_PAD_SLACK = 1.5, 64
# Use ATen's fused CPU flash kernels for CPU tensors (tests switch this off to cover the explicit path).
_CPU_FLASH = True
# Use the small-head native kernels (kernels/cpu_native.py) where they take the inputs: CPU fp32, head size
# 16/32/48/64; the chunked ATen path below serves the rest (tests switch this off to cover it).
_CPU_NATIVE = True

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


def _native(*tensors: torch.Tensor) -> bool:
    """True when the small-head native kernels run this call (see ``_CPU_NATIVE``)."""
    return _CPU_NATIVE and cpu_native.supports(*tensors)


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
    A chunk also stops growing when its padded key rows would exceed ``_PAD_RATIO`` x its real ones
    + ``_PAD_SLACK`` (skewed batches: one long sequence is not padded together with many short ones;
    callers sort sequences longest first so that consecutive ones are of similar length). A sequence too large on its own
    is split into query-row blocks; a row block ``[j0, j1)`` of sequence i is itself a
    bottom-right-aligned query subset over keys ``0 .. L_i - q_i + j1 - 1``.
    """
    budget = _SCORE_BUDGET if budget is None else budget

    def cost(n: int, max_q: int, max_l: int, full: bool) -> int:
        if fused:
            return n * max_l * heads * head_dim if full else n * max_q * max_l
        return n * heads * max_q * max_l

    chunks: list[_Chunk] = []
    run: list[int] = []  # sequence ids of the current run
    run_q = run_l = run_rows = 0
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
            run, run_q, run_l, run_rows, run_full = [], 0, 0, 0, True
            rows = max(1, budget // cost(1, 1, n_k, False))
            for j0 in range(0, n_q, rows):
                j1 = min(n_q, j0 + rows)
                n_vis = n_k - n_q + j1  # keys visible to the last row of the block
                chunks.append(_Chunk(qo[i] + j0, qo[i] + j1, kv[i], kv[i] + n_vis, (0, j1 - j0), (0, n_vis)))
            continue
        new_q, new_l, new_full = max(run_q, n_q), max(run_l, n_k), run_full and full
        too_costly = cost(len(run) + 1, new_q, new_l, new_full) > budget
        too_padded = (len(run) + 1) * new_l > _PAD_RATIO * (run_rows + n_k) + _PAD_SLACK
        if run and (too_costly or too_padded):
            flush()
            run, new_q, new_l, new_full, run_rows = [], n_q, n_k, full, 0
        run.append(i)
        run_q, run_l, run_full, run_rows = new_q, new_l, new_full, run_rows + n_k
    flush()
    return chunks


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


def _pad_rows(rows: torch.Tensor, idx: torch.Tensor, zero: bool = False) -> torch.Tensor:
    """``rows [R, H, X]`` gathered into a padded grid ``idx [n, M]`` (row numbers, ``-1`` = padding)
    -> ``[n, H, M, X]``; a padded slot holds a copy of its own sequence's first row, or zeros (``zero``).

    Whole-row copies (``index_select``: 1.8x faster than advanced indexing with the 2-D index), handed
    out as a transposed view, not a copy: the CPU flash kernels and matmuls read strided ``[n, H, M, X]``
    as they are. Only the backward's query side needs zeros (``q = dO = lse = 0``: ``P = 1`` stays finite
    and ``dS = 0``, whatever the keys); elsewhere a padded slot is a masked key or a dropped output row
    (zeroing them made the candidate-prefix op ~1.2x slower on long histories,
    ``bench/attention_op_compare.py``), and copying the sequence's own row keeps every value a fused call
    mixes into a sequence its own: a non-finite input stays in its sequence, as in the reference.
    """
    n, m = idx.shape
    src = torch.where(idx < 0, idx[:, :1], idx).clamp_min(0)  # a sequence with no rows: row 0, all dropped
    padded = rows.index_select(0, src.flatten()).view(n, m, *rows.shape[1:])  # [n, M, H, X]
    if zero:
        padded.masked_fill_((idx < 0)[:, :, None, None], 0)
    return padded.transpose(1, 2)


def _to_rows(grid: torch.Tensor) -> torch.Tensor:
    """``[n, H, M, *]`` -> ``[n * M, H, *]``, one row per grid slot (a view for the flash kernels' outputs)."""
    n, h, m = grid.shape[:3]
    return grid.transpose(1, 2).reshape(n * m, h, *grid.shape[3:])


def _scatter_slots(idx: torch.Tensor, scratch: int) -> torch.Tensor:
    """Destination row of every slot of ``idx [n, M]``: its row, or the ``scratch`` row for padding."""
    return idx.masked_fill(idx < 0, scratch).flatten()


def _slot_rows(lo: int, offs: tuple[int, ...], rows: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``[n, max len]`` grid of a chunk: slot ``(i, j)`` holds the original row of the chunk's sequence i's
    row j (``-1`` past its length); ``lo``, ``offs``: the chunk's rows in longest-first order, ``rows``
    the original row of every sorted row (``None``: the batch was already in that order)."""
    o = torch.tensor(offs, device=device)
    lens = o.diff()
    j = torch.arange(int(lens.max()), device=device)
    pos = lo + o[:-1, None] + j[None, :]
    ok = j[None, :] < lens[:, None]
    if rows is not None:
        pos = rows[pos.masked_fill(~ok, 0)]
    return pos.masked_fill(~ok, -1)


def _chunk_grids(c: _Chunk, q_rows: torch.Tensor | None, k_rows: torch.Tensor | None, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key grids ``[n, Qmax]``, ``[n, Lmax]`` of chunk ``c`` over the original rows."""
    k_idx = _slot_rows(c.k_lo, c.k_offs, k_rows, device)
    if q_rows is k_rows and c.q_lo == c.k_lo and c.q_offs == c.k_offs:
        return k_idx, k_idx
    return _slot_rows(c.q_lo, c.q_offs, q_rows, device), k_idx


def _rows(offs: list[int], new_offs: list[int], order: list[int], device: torch.device) -> torch.Tensor:
    """Row ``r`` of the permuted jagged tensor is row ``rows[r]`` of the original one."""
    lens = torch.tensor([offs[i + 1] - offs[i] for i in order], dtype=torch.int64, device=device)
    start = torch.tensor([offs[i] for i in order], dtype=torch.int64, device=device)
    shift = start - torch.tensor(new_offs[:-1], dtype=torch.int64, device=device)
    return torch.arange(new_offs[-1], device=device) + torch.repeat_interleave(shift, lens)


def _length_sorted(kv: list[int], qo: list[int], device: torch.device):
    """Sequences longest first (stable): ``(kv', qo', k_rows, q_rows)``, the permuted offsets and the
    original row of every permuted key / query row; ``(kv, qo, None, None)`` when already in that order.

    Chunks are runs of consecutive sequences, padded to the run's longest: in batch order a heavy-tailed
    batch pads many short sequences to a long one (~2.9x the real ``sum L_i^2`` on the default data);
    sorted, a run holds sequences of similar length. Each sequence is attended on its own rows only,
    so the order changes no result (chunks gather from and scatter to the original rows).
    """
    n = len(kv) - 1
    order = sorted(range(n), key=lambda i: kv[i] - kv[i + 1])
    if order == list(range(n)):
        return kv, qo, None, None
    kv2, qo2 = [0], [0]
    for i in order:
        kv2.append(kv2[-1] + kv[i + 1] - kv[i])
        qo2.append(qo2[-1] + qo[i + 1] - qo[i])
    k_rows = _rows(kv, kv2, order, device)
    q_rows = k_rows if qo is kv else _rows(qo, qo2, order, device)
    return kv2, (kv2 if qo is kv else qo2), k_rows, q_rows


def jagged_causal_attention_torch_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_offsets: torch.Tensor,
    q_offsets: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked padded attention. Returns ``out [sum q_i, H, Dh]`` and ``lse [H, sum q_i]`` (fp32)."""
    if _native(q, k, v):
        return cpu_native.jagged_fwd(q, k, v, kv_offsets, q_offsets, scale)
    kv = kv_offsets.tolist()  # host sync: chunk plan
    kv, qo, k_rows, q_rows = _length_sorted(kv, kv if q_offsets is None else q_offsets.tolist(), q.device)
    rows, h, d = q.shape
    out = q.new_empty(rows + 1, h, d)  # + a scratch row that every padded slot is written to
    lse = torch.empty((rows + 1, h), dtype=torch.float32, device=q.device)
    for c in _plan_chunks(kv, qo, h, d, _fused(q.device)):
        if c.q_hi == c.q_lo:
            continue
        q_idx, k_idx = _chunk_grids(c, q_rows, k_rows, q.device)
        o, l_pad = attend_fwd(_pad_rows(q, q_idx), _pad_rows(k, k_idx), _pad_rows(v, k_idx), scale,
                              **_chunk_mask(c, q.device))  # [n, H, Qmax, Dh], [n, H, Qmax]
        dst = _scatter_slots(q_idx, rows)
        out.index_copy_(0, dst, _to_rows(o))
        lse.index_copy_(0, dst, _to_rows(l_pad))
    return out[:rows], lse[:rows].T.contiguous()


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
    """Backward chunk by chunk (same sorted order and chunk plan as the forward). Returns ``(dq, dk, dv)``."""
    if _native(dout, q, k, v, out):
        return cpu_native.jagged_bwd(dout, q, k, v, out, lse, kv_offsets, q_offsets, scale)
    kv = kv_offsets.tolist()
    kv, qo, k_rows, q_rows = _length_sorted(kv, kv if q_offsets is None else q_offsets.tolist(), q.device)
    rows, h, d = q.shape
    n_k = k.shape[0]
    dq = q.new_empty(rows + 1, h, d)  # every query row lies in exactly one chunk; + the scratch row
    dk = torch.zeros((n_k + 1, h, d), dtype=torch.float32, device=k.device)  # row blocks of one sequence add up
    dv = torch.zeros((n_k + 1, h, d), dtype=torch.float32, device=v.device)
    lse_rows = lse.T[..., None]  # [sum q_i, H, 1], a view
    for c in _plan_chunks(kv, qo, h, d, _fused(q.device)):
        if c.q_hi == c.q_lo:
            continue
        q_idx, k_idx = _chunk_grids(c, q_rows, k_rows, q.device)
        # Padded rows: dO = 0, q = 0 and lse = 0, so P = exp(0) = 1 stays finite and dS = 0 there.
        lp = _pad_rows(lse_rows, q_idx, zero=True)[..., 0].contiguous()  # [n, H, Qmax]
        dqp, dkp, dvp = attend_bwd(_pad_rows(dout, q_idx, True), _pad_rows(q, q_idx, True), _pad_rows(k, k_idx),
                                   _pad_rows(v, k_idx), _pad_rows(out, q_idx), lp, scale, **_chunk_mask(c, q.device))
        dq.index_copy_(0, _scatter_slots(q_idx, rows), _to_rows(dqp))
        k_dst = _scatter_slots(k_idx, n_k)
        dk.index_add_(0, k_dst, _to_rows(dkp).float())
        dv.index_add_(0, k_dst, _to_rows(dvp).float())
    return dq[:rows], dk[:n_k].to(k.dtype), dv[:n_k].to(v.dtype)


# ----------------------------------------------------------------------------------------------
# Candidate-prefix attention
# ----------------------------------------------------------------------------------------------
def _candidate_segments(po: list[int], co: list[int], n_tok: int, heads: int, budget: int
                        ) -> list[list[tuple[int, int, int]]]:
    """Plan the prefix part: segments ``(b, c0, c1)`` (request b, candidates c0:c1) grouped into chunks.

    A chunk is attended as one padded batch, ``[n_seg, H, max rows, max L]`` score elements, kept under
    ``budget``; a request whose candidates alone exceed it is split into several segments (each reads
    the same prefix). Requests with an empty prefix or no candidates need no prefix work at all.
    Requests are visited longest prefix first (stable), and a chunk stops growing when its padded prefix
    rows would exceed ``_PREFIX_PAD_RATIO`` x its real ones (+ ``_PREFIX_PAD_SLACK``), so a chunk pads to a length
    near its own requests' (a heavy-tailed batch in request order padded every request of a chunk to the
    chunk's longest: ~8x the real score elements on the default data; sorted: ~1.3x, 1.9x less time for
    forward + backward, docs/performance.md). Segments write disjoint query rows: the order changes no result.
    """
    chunks: list[list[tuple[int, int, int]]] = []
    run: list[tuple[int, int, int]] = []
    run_m = run_l = run_rows = 0
    order = sorted(range(len(po) - 1), key=lambda b: po[b] - po[b + 1])  # longest prefix first, stable
    for b in order:
        length = po[b + 1] - po[b]
        if length == 0 or co[b + 1] == co[b]:
            continue
        step = max(1, budget // (heads * n_tok * length))
        for c0 in range(co[b], co[b + 1], step):
            c1 = min(co[b + 1], c0 + step)
            m = (c1 - c0) * n_tok
            new_m, new_l = max(run_m, m), max(run_l, length)
            too_costly = (len(run) + 1) * heads * new_m * new_l > budget
            too_padded = (len(run) + 1) * new_l > _PREFIX_PAD_RATIO * (run_rows + length) + _PREFIX_PAD_SLACK
            if run and (too_costly or too_padded):
                chunks.append(run)
                run, new_m, new_l, run_rows = [], m, length, 0
            run.append((b, c0, c1))
            run_m, run_l, run_rows = new_m, new_l, run_rows + length
    if run:
        chunks.append(run)
    return chunks


class _PrefixGrid:
    """Padded layout of one chunk of segments: NS query rows ``[n, M]`` and prefix key rows ``[n, Lmax]``.

    Index ``-1`` marks padding (:func:`_pad_rows`). Padded keys are masked out; padded query rows see
    real keys (every segment has L >= 1), so nothing is NaN, and they are dropped.
    """

    def __init__(self, seg: list[tuple[int, int, int]], po: list[int], n_tok: int, device: torch.device) -> None:
        m = max((c1 - c0) * n_tok for _, c0, c1 in seg)
        lmax = max(po[b + 1] - po[b] for b, _, _ in seg)
        q_start = torch.tensor([c0 * n_tok for _, c0, _ in seg], device=device)
        q_len = torch.tensor([(c1 - c0) * n_tok for _, c0, c1 in seg], device=device)
        k_start = torch.tensor([po[b] for b, _, _ in seg], device=device)
        k_len = torch.tensor([po[b + 1] - po[b] for b, _, _ in seg], device=device)
        q_ok = torch.arange(m, device=device) < q_len[:, None]  # [n, M]
        k_ok = torch.arange(lmax, device=device) < k_len[:, None]  # [n, Lmax]
        self.q_idx = torch.where(q_ok, q_start[:, None] + torch.arange(m, device=device), -1)
        self.k_idx = torch.where(k_ok, k_start[:, None] + torch.arange(lmax, device=device), -1)
        self.q_flat = q_ok.flatten().nonzero().squeeze(1)  # real query slots in the n*M grid
        self.q_rows = self.q_idx.flatten()[self.q_flat]  # ... and their rows in the jagged tensors
        self.k_flat = k_ok.flatten().nonzero().squeeze(1)
        self.k_rows = self.k_idx.flatten()[self.k_flat]
        self.visible = k_ok[:, None, None, :]  # [n, 1, 1, Lmax]: key padding only

    @staticmethod
    def pad(rows: torch.Tensor, idx: torch.Tensor, zero: bool = False) -> torch.Tensor:
        """``rows [R, H, X]`` -> ``[n, H, M, X]`` (:func:`_pad_rows`: costs the chunk's size; appending a
        zero row to ``rows`` instead copied the whole tensor, e.g. every request's prefix for every
        candidate chunk of the scorer)."""
        return _pad_rows(rows, idx, zero)

    @staticmethod
    def _unpad(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        return _to_rows(x).index_select(0, flat)

    def real_queries(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, H, M, *]`` -> ``[R, H, *]`` for the real query rows (in ``q_rows`` order)."""
        return self._unpad(x, self.q_flat)

    def real_keys(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, H, Lmax, Dh]`` -> ``[K, H, Dh]`` for the real prefix rows (in ``k_rows`` order)."""
        return self._unpad(x, self.k_flat)


def _candidate_major(x: torch.Tensor) -> torch.Tensor:
    """``[C, N, H, *]`` <-> ``[C, H, N, *]`` as a view: the own-token attention is causal attention over each
    candidate's N tokens, ``C`` sequences of length N, in the flash kernels' layout."""
    return x.transpose(1, 2)


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
    """Returns ``out [sum C_b, N, H, Dh]`` and the joint ``lse [H, sum C_b * N]`` (fp32).

    Own tokens: every candidate at once (one fused causal call over C sequences of N). Prefix: a few padded batches over
    many requests (one fused call per chunk, not per request: training batches have hundreds of
    requests with a handful of candidates each). The two partial softmaxes merge by log-sum-exp.
    """
    if _native(q, k, v, prefix_k, prefix_v):
        return cpu_native.prefix_fwd(q, k, v, prefix_k, prefix_v, prefix_offsets, cand_offsets, scale)
    c_tot, n, h, d = q.shape
    po, co = prefix_offsets.tolist(), cand_offsets.tolist()  # host sync: chunk plan
    # Own tokens: causal attention of C sequences of length N, one fused call ([C, H, N, Dh] views; the
    # flash kernel writes [C, N, H, *], so both transposes back are free views).
    o_own, l_own = attend_fwd(*map(_candidate_major, (q, k, v)), scale, is_causal=True)
    out = _candidate_major(o_own).reshape(c_tot * n, h, d).float()  # [C*N, H, Dh] rows, fp32 for the merge
    lse = _candidate_major(l_own).reshape(c_tot * n, h)  # [C*N, H]
    q_src, k_src, v_src = q.reshape(c_tot * n, h, d), prefix_k, prefix_v
    for seg in _candidate_segments(po, co, n, h, _SCORE_BUDGET):
        g = _PrefixGrid(seg, po, n, q.device)
        o_pre, l_pre = attend_fwd(g.pad(q_src, g.q_idx), g.pad(k_src, g.k_idx), g.pad(v_src, g.k_idx),
                                  scale, visible=g.visible)  # [n, H, M, Dh], [n, H, M]
        o_pre, l_pre = g.real_queries(o_pre).float(), g.real_queries(l_pre)  # [R, H, Dh], [R, H]
        l_own, o_mine = lse.index_select(0, g.q_rows), out.index_select(0, g.q_rows)
        l_joint = torch.logaddexp(l_pre, l_own)  # softmax over [prefix ; own] from the two partials
        merged = torch.exp(l_pre - l_joint)[..., None] * o_pre + torch.exp(l_own - l_joint)[..., None] * o_mine
        out.index_copy_(0, g.q_rows, merged)
        lse.index_copy_(0, g.q_rows, l_joint)
    return out.view(c_tot, n, h, d).to(q.dtype), lse.T.contiguous()


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
    """Backward given the joint output and lse: ``(dq, dk, dv, dprefix_k, dprefix_v)``.

    With the *joint* ``out``/``lse`` each key set's share of the gradient is exact on its own: own
    tokens by one fused causal backward for all candidates, the prefix by the fused backward per chunk.
    """
    if _native(dout, q, k, v, prefix_k, prefix_v, out):
        return cpu_native.prefix_bwd(dout, q, k, v, prefix_k, prefix_v, out, lse, prefix_offsets, cand_offsets, scale)
    c_tot, n, h, d = q.shape
    po, co = prefix_offsets.tolist(), cand_offsets.tolist()
    lse_rows = lse.T.contiguous()  # [C*N, H]
    l_joint = lse_rows.view(c_tot, n, h)  # [C, N, H]
    # Own tokens: the fused backward over each candidate's N tokens with the joint out / lse (exact share).
    dq, dk, dv = attend_bwd(*map(_candidate_major, (dout, q, k, v, out)), l_joint.transpose(1, 2), scale,
                            is_causal=True)
    dq = _candidate_major(dq).reshape(c_tot * n, h, d).float()  # prefix shares are added per chunk
    dk, dv = _candidate_major(dk).contiguous(), _candidate_major(dv).contiguous()  # no copy from the CPU kernel
    dpk = torch.zeros(prefix_k.shape, dtype=torch.float32, device=q.device)  # summed over candidates
    dpv = torch.zeros(prefix_v.shape, dtype=torch.float32, device=q.device)
    q_src, do_src, o_src = (x.reshape(c_tot * n, h, d) for x in (q, dout, out))
    k_src, v_src, l_src = prefix_k, prefix_v, lse_rows[..., None]
    for seg in _candidate_segments(po, co, n, h, _SCORE_BUDGET):
        g = _PrefixGrid(seg, po, n, q.device)
        # Padded query rows: dO = 0, q = 0, lse = 0 -> P = exp(0) = 1 stays finite and dS = 0 there.
        lp = g.pad(l_src, g.q_idx, zero=True)[..., 0].contiguous()  # [n, H, M]
        dqp, dkp, dvp = attend_bwd(g.pad(do_src, g.q_idx, True), g.pad(q_src, g.q_idx, True), g.pad(k_src, g.k_idx),
                                   g.pad(v_src, g.k_idx), g.pad(o_src, g.q_idx), lp, scale, visible=g.visible)
        dq.index_add_(0, g.q_rows, g.real_queries(dqp).float())
        dpk.index_add_(0, g.k_rows, g.real_keys(dkp).float())
        dpv.index_add_(0, g.k_rows, g.real_keys(dvp).float())
    return (dq.view(c_tot, n, h, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpk.to(prefix_k.dtype),
            dpv.to(prefix_v.dtype))
