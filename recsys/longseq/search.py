"""Search-based selection over a long history (SIM / TWIN style) and target attention over the result.

Shape legend: ``B`` requests, ``E`` history events (jagged, ``ev_offsets [B+1]``), ``C``
candidates (``cand_owner [C]`` = request of each), ``K`` events kept per candidate.

Both searches return a jagged selection: ``index [sum_c n_c]`` (rows of the event arrays,
best first) and ``offsets [C+1]``, ``n_c = min(K, matches)``; nothing is padded to the longest
history.

* :func:`hard_search`: events whose category equals the candidate's, most recent first
  (ties in time: the later row first). One sort of the events by (request, category, time),
  then a binary search per candidate: O(E log E + C log E + sum n_c); no C x E work.
* :func:`soft_search`: the K events with the largest inner product with the candidate in a
  separate, decoupled search space (DARE-style: the search/attention embeddings are not the
  ones that carry the values). One ``[C_b, E_b]`` score matrix per request.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from recsys.data.jagged import lengths_to_offsets, ranges


def hard_search(ev_category: torch.Tensor, ev_ts: torch.Tensor, ev_offsets: torch.Tensor, cand_category: torch.Tensor,
                cand_owner: torch.Tensor, k: int, n_cat: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per candidate, its request's events of the candidate's category, most recent first, at most ``k``.

    ``n_cat``: a bound on the category ids (the table size; else read from the data). The selection's
    total length is data-dependent, so this reads one size back (``ranges``).
    """
    n_ev = ev_category.shape[0]
    dev = ev_category.device
    req = torch.repeat_interleave(torch.arange(ev_offsets.shape[0] - 1, device=dev), ev_offsets[1:] - ev_offsets[:-1],
                                  output_size=n_ev)
    if n_cat is None:
        n_cat = max(int(ev_category.max()) if n_ev else 0, int(cand_category.max()) if cand_category.numel() else 0) + 1
    # Lexicographic order (request, category, ts desc, row desc) by stable sorts, last key first.
    order = torch.arange(n_ev - 1, -1, -1, device=dev)  # row desc
    order = order[torch.argsort(-ev_ts[order], stable=True)]
    key = req * n_cat + ev_category
    order = order[torch.argsort(key[order], stable=True)]
    sorted_key = key[order]
    cand_key = cand_owner * n_cat + cand_category
    lo = torch.searchsorted(sorted_key, cand_key, right=False)
    hi = torch.searchsorted(sorted_key, cand_key, right=True)
    n = (hi - lo).clamp(max=k)
    return order[ranges(lo, n)[0]], lengths_to_offsets(n)


def soft_search(cand_keys: torch.Tensor, ev_keys: torch.Tensor, ev_offsets: torch.Tensor, cand_offsets: torch.Tensor,
                k: int, sizes: tuple[Sequence[int], Sequence[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per candidate (``cand_keys [C, Ds]``), the top-``k`` events by ``cand . ev`` (``ev_keys [E, Ds]``).

    ``sizes``: (events, candidates) of every request as Python ints, else read from the offsets.
    """
    # A loop over requests: each request's [C_b, E_b] block is dense, so torch.topk does the work
    # without padding every request to the longest history (fbgemm has no jagged top-k op).
    index, counts = [], []
    if sizes is None:
        eo, co = ev_offsets.tolist(), cand_offsets.tolist()
    else:
        eo, co = [0, *itertools.accumulate(sizes[0])], [0, *itertools.accumulate(sizes[1])]
    for b in range(len(eo) - 1):
        c_b, e_b = co[b + 1] - co[b], eo[b + 1] - eo[b]
        kk = min(k, e_b)
        if c_b == 0:
            continue
        if kk == 0:
            counts.append(torch.zeros(c_b, dtype=torch.int64, device=ev_keys.device))
            continue
        scores = cand_keys[co[b]:co[b + 1]] @ ev_keys[eo[b]:eo[b + 1]].T  # [C_b, E_b]
        top = torch.topk(scores, kk, dim=-1, sorted=True).indices  # [C_b, kk]
        index.append((top + eo[b]).flatten())
        counts.append(torch.full((c_b,), kk, dtype=torch.int64, device=ev_keys.device))
    flat = torch.cat(index) if index else torch.zeros(0, dtype=torch.int64, device=ev_keys.device)
    n = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.int64, device=ev_keys.device)
    return flat, lengths_to_offsets(n)


def target_attention(logits: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Softmax pooling per jagged segment: ``logits [sum n_c]``, ``values [sum n_c, Dv]``, ``offsets [C+1]``
    -> ``[C, Dv]`` (zeros for an empty segment)."""
    n = offsets[1:] - offsets[:-1]
    n_seg = n.shape[0]
    seg = torch.repeat_interleave(torch.arange(n_seg, device=logits.device), n, output_size=logits.shape[0])
    top = logits.new_full((n_seg,), float("-inf")).scatter_reduce(0, seg, logits, reduce="amax")
    w = torch.exp(logits - top[seg])  # [sum n_c]
    denom = logits.new_zeros(n_seg).index_add_(0, seg, w)
    pooled = values.new_zeros(n_seg, values.shape[-1]).index_add_(0, seg, w[:, None] * values)
    return pooled / denom.clamp_min(1e-30)[:, None]
