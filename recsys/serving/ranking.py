"""The one full-catalog ranking: targets, seen items, top-K and 0-based target ranks of scored requests.

Used by the scoring job (``mode=catalog``, ``recsys.serving.modes``) and by the evaluation report
(``recsys.evaluate.catalog``, every model family); both feed the README's HR@K / NDCG@K figures.

Shape legend: ``B`` requests, ``M`` catalog items, ``t`` targets of a request.

Protocol:

* **Candidate set** (:class:`Catalog`): ascending, unique item ids, never item 0. Item 0 is the
  padding / unknown id (``recsys.data``: OOV items are encoded as 0): it is no real item, so it is
  never ranked, never a target and never "seen".
* **Targets** of a request (:func:`request_targets`): its listed candidates (``CatalogTarget.candidates``,
  leave-one-out data) or those labelled 1 on the *ranked task* (``CatalogTarget.positives``).
* **Ranked task**: the score that orders the catalog is one task's logit (``rank_task``, default the
  first task); baselines without per-task catalog scores (SASRec's next-item score) use their own.
* **Seen items** (``exclude_history``): items of the request's loader-truncated history are removed from
  its ranking (score -inf), targets excepted.
* **Ranks**: best score first, ties by ascending item id (= catalog position); the 0-based rank of a
  target is ``#{score > s_t} + #{score == s_t, id < t}``, consistent with the top-K lists. A target
  outside the candidate set (a ``catalog.items_file`` subset) has rank -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recsys.data.batch import RequestBatch
from recsys.data.jagged import offsets_from_lengths
from recsys.serving.config import CatalogTarget


@dataclass
class Catalog:
    """The candidate set: ``items [M]`` int64 ascending unique ids >= 1, ``cats [M]`` their categories."""

    items: np.ndarray
    cats: np.ndarray
    num_items: int
    """Size of the id space (schema): ids ``0 .. num_items-1``."""

    def __post_init__(self) -> None:
        if self.items.size and (self.items[0] < 1 or (np.diff(self.items) <= 0).any()
                                or self.items[-1] >= self.num_items):
            raise ValueError(f"catalog items must be ascending unique ids in 1..{self.num_items - 1}")
        self._position = np.full(self.num_items, -1, dtype=np.int64)
        self._position[self.items] = np.arange(self.items.size)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Catalog position of every id ``[n]`` (-1: not in the candidate set, item 0 and out-of-range ids too)."""
        ids = np.asarray(ids, dtype=np.int64)
        ok = (ids >= 0) & (ids < self.num_items)
        out = np.full(ids.shape, -1, dtype=np.int64)
        out[ok] = self._position[ids[ok]]
        return out


def request_targets(batch: RequestBatch, target: CatalogTarget, task: int) -> list[np.ndarray]:
    """Per request, its relevant item ids (unique, ascending, item 0 dropped): the listed candidates, or
    those labelled 1 on task ``task`` (``CatalogTarget.positives``)."""
    items = batch.cand["item_id"].values().cpu().numpy().astype(np.int64)
    pos = batch.labels[:, task].cpu().numpy() > 0.5
    off = batch.cand_offsets.cpu().tolist()
    out = []
    for b in range(batch.num_requests):
        sel = items[off[b]:off[b + 1]]
        if target == CatalogTarget.positives:
            sel = sel[pos[off[b]:off[b + 1]]]
        out.append(np.unique(sel[sel > 0]))
    return out


def history_items(batch: RequestBatch, kinds: list[str]) -> list[np.ndarray]:
    """Per request, the item ids of its (loader-truncated) history over all ``kinds`` (unique, item 0 dropped)."""
    seq = batch.seq.to_dict()
    per_kind = []
    for k in kinds:
        jt = seq[f"{k}.item_id"]
        off = offsets_from_lengths(jt.lengths().cpu().numpy())
        vals = jt.values().cpu().numpy().astype(np.int64)
        per_kind.append([vals[off[b]:off[b + 1]] for b in range(batch.num_requests)])
    out = []
    for b in range(batch.num_requests):
        seen = np.unique(np.concatenate([p[b] for p in per_kind]) if per_kind else np.zeros(0, np.int64))
        out.append(seen[seen > 0])
    return out


@dataclass
class RankedRequest:
    """One request's ranking."""

    top: np.ndarray
    """``[min(k, M - removed)]`` catalog positions, best first (removed seen items never among them)."""
    targets: np.ndarray
    """``[t]`` target item ids, ascending."""
    target_pos: np.ndarray
    """``[t]`` catalog position of each target (-1: outside the candidate set)."""
    target_rank: np.ndarray
    """``[t]`` 0-based rank of each target (-1: outside the candidate set)."""


def rank_requests(scores: torch.Tensor, catalog: Catalog, targets: list[np.ndarray], seen: list[np.ndarray] | None,
                  top_k: int) -> list[RankedRequest]:
    """Rank the catalog for every request. ``scores [B, M]``: the ranked score of every catalog item
    (position order); ``targets``: per request (:func:`request_targets`); ``seen``: per request, items
    removed from its ranking (:func:`history_items`), or None to keep them; ``top_k = 0``: ranks only.
    ``scores`` is not modified."""
    out = []
    for b, tgt in enumerate(targets):
        s = scores[b]
        pos = catalog.positions(tgt)
        drop = np.zeros(0, dtype=np.int64)
        if seen is not None and seen[b].size:
            drop = catalog.positions(np.setdiff1d(seen[b], tgt))
            drop = drop[drop >= 0]
            if drop.size:
                s = s.clone()
                s[torch.as_tensor(drop, device=s.device)] = float("-inf")  # ranked below every other item
        rank = np.full(pos.shape, -1, dtype=np.int64)
        inside = pos >= 0
        if inside.any():
            rank[inside] = target_ranks(s, torch.as_tensor(pos[inside], device=s.device)).cpu().numpy()
        top = np.zeros(0, dtype=np.int64)
        if top_k:  # removed items never fill the top K, even when fewer than K items remain
            top = top_k_positions(s, top_k + drop.size).cpu().numpy()
            top = top[~np.isin(top, drop)][:top_k]
        out.append(RankedRequest(top, tgt, pos, rank))
    return out


def target_ranks(scores: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
    """0-based ranks of targets. ``scores [M]`` of one request, ``target_index [t]`` catalog positions.

    Rank = #{score > s_t} + #{score == s_t and position < target's}: ties go to the lower item id
    (catalog positions are in ascending item id), matching :func:`top_k_positions`.
    """
    s_t = scores[target_index]  # [t]
    higher = (scores[None, :] > s_t[:, None]).sum(1)
    pos = torch.arange(scores.numel(), device=scores.device)
    tied_before = ((scores[None, :] == s_t[:, None]) & (pos[None, :] < target_index[:, None])).sum(1)
    return higher + tied_before


def top_k_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Catalog positions of the ``k`` best scores of ``[M]`` (best first, ties by ascending position)."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]
