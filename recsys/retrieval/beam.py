"""Constrained beam search over semantic IDs: every finished beam is a real catalog item.

Shapes: ``R`` requests, ``W`` beam width (= results per request), ``L`` SID length, ``V`` codes.

The decoder plugs in as ``step_logprobs(prefix_codes [R*W, t]) -> [R*W, V]``: the log-probabilities of
the next code after each beam's prefix. Row ``r * W + w`` is beam ``w`` of request ``r`` (the decoder
runs the ``W`` beams of a request as that request's candidates against its shared, cached user prefix:
``cand_offsets = arange(R + 1) * W`` for ``candidate_prefix_attention``). The decoder always sees
``R*W`` rows of real catalog prefixes: a slot with no live beam (step 0, where only the root exists,
or a catalog with fewer than ``W`` prefixes at a level) is a filler, ignored: at step 0 it is the
root, later it extends slot 0's previous prefix by that prefix's smallest child code. Codes the trie
does not allow after a prefix get ``-inf`` (the constraint), so does a code the decoder gives
``-inf``: such items are treated as impossible.

A decoder with an incremental cache (``recsys.retrieval.sid_decoder``) passes ``on_select``: after
every step but the last it is called with ``parent [R*W]`` int64, row ``i`` of the next call's prefixes
being row ``parent[i]`` of this call's prefixes plus one code (fillers included: a filler's parent is
slot 0 of its request), so the caller gathers its per-beam cache with it.

Per step: ``score[r, w] + logp[r*W + w, c]`` over valid ``(w, c)``, top ``W`` of the ``W * V`` kept.
Beams are distinct trie nodes, so the finished results are distinct items.

Fewer than ``W`` reachable items: the request gets all of them, best first, then ``item -1`` with score
``-inf`` (and codes -1) in the remaining slots.

Exactness. Beam search is a heuristic: a prefix dropped at step ``t`` may have led to a better item than
those kept. When every log-probability is ``<= 0`` (a normalised decoder), a prefix's score bounds every
item under it, so ``bound[r]`` = the best score of any dropped prefix bounds every item not returned. If
the ``W``-th result scores ``>= bound`` the results *are* the exact top-``W`` of all catalog items:
``certified[r]``. With ``W >=`` the number of prefixes at every level nothing is dropped and every
request is certified. A step with any positive log-probability turns certification off for the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from recsys.errors import InputError
from recsys.retrieval.sid_trie import SidTrie

StepFn = Callable[[torch.Tensor], torch.Tensor]
SelectFn = Callable[[torch.Tensor], None]
NEG_INF = float("-inf")


@dataclass
class BeamResult:
    item_ids: torch.Tensor
    """[R, W] int64, best first; -1 in slots beyond the reachable items."""
    scores: torch.Tensor
    """[R, W] float: summed log-probability of each result's SID; -inf in empty slots."""
    codes: torch.Tensor
    """[R, W, L] int64: the SIDs; -1 in empty slots."""
    certified: torch.Tensor
    """[R] bool: the results are provably the exact top-W (see the module docstring)."""


def _step_scores(trie: SidTrie, t: int, step_logprobs: StepFn, prefix: torch.Tensor, nodes: torch.Tensor,
                 scores: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """One decoder call -> (candidate scores ``[R, W * V]``, -inf where not allowed; normalised?)."""
    r, w = nodes.shape
    v = trie.vocab_size
    logp = step_logprobs(prefix.reshape(r * w, t))
    if logp.shape != (r * w, v):
        raise InputError(f"step_logprobs returned shape {tuple(logp.shape)} at step {t}; expected "
                         f"[{r * w}, {v}] (rows = requests x beams, columns = the SID vocabulary)")
    if torch.isnan(logp).any():
        raise InputError(f"step_logprobs returned NaN at step {t}")
    allowed = trie.next_code_mask(t, nodes.reshape(-1)) & (scores.reshape(-1, 1) > NEG_INF)  # [R*W, V]
    cand = torch.where(allowed, scores.reshape(-1, 1) + logp.float(), NEG_INF)
    return cand.reshape(r, w * v), bool(logp.max() <= 0) if logp.numel() else True


def constrained_beam_search(trie: SidTrie, step_logprobs: StepFn, num_requests: int,
                            beam_width: int, on_select: SelectFn | None = None) -> BeamResult:
    """Top-``beam_width`` items per request by summed code log-probability, every one in ``trie``.
    ``on_select(parent [R*W])``: see the module docstring (beam re-selection, for a decoder's cache)."""
    if beam_width < 1 or num_requests < 0:
        raise InputError(f"beam search needs beam_width >= 1 and num_requests >= 0, got {beam_width}, "
                         f"{num_requests}")
    r, w, v = num_requests, beam_width, trie.vocab_size
    nodes = torch.zeros(r, w, dtype=torch.int64)  # trie node of each beam at the current level
    scores = torch.full((r, w), NEG_INF)
    scores[:, 0] = 0.0  # one live beam (the root) per request at step 0
    prefix = torch.zeros(r, w, 0, dtype=torch.int64)  # [R, W, t]
    bound = torch.full((r,), NEG_INF)
    normalised = True
    for t in range(trie.depth):
        cand, norm = _step_scores(trie, t, step_logprobs, prefix, nodes, scores)
        normalised &= norm
        top, idx = cand.topk(min(w + 1, w * v), dim=1)  # [R, W+1] best first
        if top.shape[1] > w:  # best dropped candidate (-inf if none was valid)
            bound = torch.maximum(bound, top[:, w])
        top, idx = top[:, :w], idx[:, :w]
        live = top > NEG_INF
        # [R, W] source beam and chosen code. Fillers (dead slots) extend slot 0 by its smallest child,
        # so every row is a real prefix whose parent row is known (slot 0's node is always real).
        smallest = trie.child_code[t][trie.child_start[t][nodes[:, 0]]]  # [R]
        beam = torch.where(live, idx // v, 0)
        code = torch.where(live, idx % v, smallest.unsqueeze(1))
        child = trie.child(t, nodes.gather(1, beam), code)
        if bool((child < 0).any()):
            raise RuntimeError(f"beam search kept a prefix outside the trie at step {t}")  # a bug, not an input
        prefix = torch.cat([prefix.gather(1, beam.unsqueeze(2).expand(-1, -1, t)), code.unsqueeze(2)], 2)
        nodes, scores = child, top
        if on_select is not None and t + 1 < trie.depth:
            on_select((beam + torch.arange(r).unsqueeze(1) * w).reshape(-1))
    live = scores > NEG_INF
    item_ids = torch.where(live, trie.leaf_item[nodes], -1)
    codes = torch.where(live.unsqueeze(2), prefix, -1)
    certified = (bound <= scores[:, -1]) & normalised
    return BeamResult(item_ids, scores, codes, certified)
