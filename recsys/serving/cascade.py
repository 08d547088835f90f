"""Retrieve -> rank (``mode=cascade``): per request, the retrievers' candidates from the catalog, re-ranked by
the OneTrans checkpoint through the cached scorer; the top ``cascade.top_n`` written.

Shape legend: ``B`` requests, ``k`` = ``cascade.retrieve_k``, ``m_b`` distinct candidates of request b
(``<= k x retrievers``), ``T`` tasks.

Per batch:

1. **retrieve**: every retriever (``recsys.retrieval.artifact.LoadedRetriever``) returns ``[B, k]`` item ids
   (``-1`` = none: a SID request whose beams were all excluded). With ``exclude_seen`` the request's
   (loader-truncated) history is excluded from retrieval: the two-tower index over-fetches and still
   returns ``k``, the SID beams are filtered after the search (fewer than ``k`` then). Targets are *not*
   exempt (a retriever cannot know them), unlike catalog mode's ``exclude_history``.
2. **union**: per request, the distinct ids of all retrievers, with a bit per retriever that found the
   item (``retrieved_by``: the kinds joined by ``+`` in ``cascade.retrievers`` order), sorted by item id.
3. **rank**: the union becomes the request's candidate list (categories from the catalog map) and is
   scored by ``CachedScorer.score_batch`` (stage 1 once per user through the cache, stage 2 in chunks);
   ordered by the ranked task's logit, ties by ascending item id (``ranking.top_k_positions`` and
   ``ranking.target_ranks``: the catalog ranking's rules, with the union as the candidate set); with
   ``cascade.fusion=rrf`` by the reciprocal-rank fusion of that order and each retriever's own
   (:func:`rrf_scores`), the written scores still the ranker's. A *residual* ranker (trained with
   ``train.hard_negatives.prior``) has its two-tower retriever's score ``u . v`` of each union item added to
   every task's logit first: its checkpoint records that retriever, and the cascade adds it.

Rows per request: its top ``top_n`` (``rank`` 0..), then each target outside them (its rank among the
union, or ``-1`` when no retriever found it; ``retrieved_by`` empty then). Targets (``cascade.target``) = the
request's listed candidates labelled 1 on the ranked task (``positives``, default) or every listed candidate
(``candidates``, leave-one-out next-item data).
Columns: ``request_id, user_id, item_id, rank, is_target, retrieved_by, rank_<retriever>..., score_<task>...``
(sigmoid); ``rank_<retriever>`` is the item's 0-based rank in that retriever's own top ``k`` list (``-1``: not in
it), so each retriever alone is measured on the same rows (``summary.cascade_metrics``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys.data.batch import RequestBatch
from recsys.data.candidates import with_request_candidates
from recsys.errors import InputError
from recsys.retrieval.artifact import LoadedRetriever
from recsys.serving.config import CascadeFusion, CatalogTarget
from recsys.serving.ranking import Catalog, history_items, request_targets, target_ranks, top_k_positions
from recsys.serving.scorer import CachedScorer
from recsys.serving.summary import cascade_metrics


def positions_in(retrieved: np.ndarray, items: np.ndarray) -> np.ndarray:
    """0-based rank of each of ``items [n]`` among the returned ids of one request's retrieved list ``[k]``
    (distinct ids best first, ``-1`` = none: an excluded SID beam is a gap that does not count), ``-1`` where
    absent."""
    kept = retrieved[retrieved >= 0]
    if kept.size == 0:
        return np.full(items.size, -1, dtype=np.int64)
    order = np.argsort(kept, kind="stable")
    sorted_ids, sorted_pos = kept[order], order
    i = np.minimum(np.searchsorted(sorted_ids, items), sorted_ids.size - 1)
    return np.where(sorted_ids[i] == items, sorted_pos[i], -1).astype(np.int64)


def union_candidates(retrieved: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-retriever ids ``[B, k]`` (``-1`` = none) -> per request (distinct ids ascending ``[m_b]``, bit mask
    ``[m_b]``: bit ``j`` set when retriever ``j`` returned the item)."""
    ids_out, bits_out = [], []
    for b in range(retrieved[0].shape[0]):
        ids = np.concatenate([r[b] for r in retrieved])
        bit = np.concatenate([np.full(r.shape[1], 1 << j, dtype=np.int64) for j, r in enumerate(retrieved)])
        ok = ids >= 0
        uniq, inv = np.unique(ids[ok], return_inverse=True)
        mask = np.zeros(uniq.size, dtype=np.int64)
        np.bitwise_or.at(mask, inv, bit[ok])
        ids_out.append(uniq)
        bits_out.append(mask)
    return ids_out, bits_out


def rrf_scores(ranker_scores: torch.Tensor, cand: np.ndarray, retrieved: list[np.ndarray], rrf_k: int) -> torch.Tensor:
    """Reciprocal-rank fusion of one request's union ``cand [m]`` (ascending ids): ``ranker_scores [m]`` give the
    ranker's 0-based rank (ties by id, as ``top_k_positions``), each of ``retrieved`` (``[k]`` ids best first,
    ``-1`` = none) its own (``positions_in``) -> ``[m]`` float64 ``sum over lists of 1 / (rrf_k + 1 + rank)``, a
    list without the item adding 0."""
    m = cand.size
    ranker_rank = torch.empty(m, dtype=torch.int64, device=ranker_scores.device)
    ranker_rank[top_k_positions(ranker_scores, m)] = torch.arange(m, device=ranker_scores.device)
    fused = 1.0 / (rrf_k + 1.0 + ranker_rank.double())
    for lst in retrieved:
        own = torch.as_tensor(positions_in(lst, cand), device=ranker_scores.device)
        fused = fused + torch.where(own >= 0, 1.0 / (rrf_k + 1.0 + own.double()), 0.0)
    return fused


class CascadeMode:
    """``mode=cascade`` (see the module docstring)."""

    def __init__(self, scorer: CachedScorer, tasks: list[str], kinds: list[str], catalog: Catalog,
                 retrievers: list[LoadedRetriever], rank_t: int, retrieve_k: int, top_n: int, exclude_seen: bool,
                 k: int, target: CatalogTarget = CatalogTarget.positives,
                 fusion: CascadeFusion = CascadeFusion.ranker, rrf_k: int = 60,
                 prior: LoadedRetriever | None = None) -> None:
        names = [r.kind for r in retrievers]
        if len(set(names)) != len(names):
            raise InputError(f"cascade.retrievers holds two retrievers of one kind ({names}); give at most one "
                             "two_tower and one sid artifact")
        m = int(catalog.items.size)
        if retrieve_k > m:
            raise InputError(f"cascade.retrieve_k={retrieve_k} exceeds the catalog's {m} items; lower retrieve_k "
                             f"(at most {m})")
        self.scorer, self.tasks, self.kinds, self.catalog = scorer, tasks, kinds, catalog
        self.retrievers, self.names, self.rank_t = retrievers, names, rank_t
        self.retrieve_k, self.top_n, self.exclude_seen, self.k = retrieve_k, top_n, exclude_seen, k
        self.target, self.fusion, self.rrf_k = CatalogTarget(target), CascadeFusion(fusion), rrf_k
        self.prior = prior  # a residual ranker's retriever: its score is added to the ranker's logits
        self.cats = np.zeros(catalog.num_items, dtype=np.int64)
        self.cats[catalog.items] = catalog.cats
        self.stage_times: dict[str, float] = {"retrieve": 0.0, "rank": 0.0}
        self.counts: dict[str, int] = {"requests_without_candidates": 0, "candidates_ranked": 0,
                                       **{f"{n}_empty_results": 0 for n in names}}
        self.record: dict[str, Any] = {"retrievers": [r.identity for r in retrievers], "retrieve_k": retrieve_k,
                                       "top_n": top_n, "exclude_seen": exclude_seen, "k": k,
                                       "rank_task": tasks[rank_t], "target": self.target.value,
                                       "fusion": self.fusion.value, **({"rrf_k": rrf_k} if self.fusion == "rrf" else {}),
                                       **({"score_prior": prior.identity} if prior is not None else {})}
        self._last_candidates = 0

    # ---- stages -------------------------------------------------------------------
    def retrieve(self, batch: RequestBatch) -> list[np.ndarray]:
        """Per retriever, item ids ``[B, k]`` (-1 = none)."""
        excl = (None, None)
        if self.exclude_seen:
            seen = history_items(batch, self.kinds)
            excl = (torch.as_tensor(np.concatenate(seen) if seen else np.zeros(0), dtype=torch.int64),
                    torch.as_tensor(np.concatenate([[0], np.cumsum([s.size for s in seen])]), dtype=torch.int64))
        out = []
        for name, r in zip(self.names, self.retrievers):
            ids = r.retrieve(batch, self.retrieve_k, *excl)[0].cpu().numpy()
            self.counts[f"{name}_empty_results"] += int((ids < 0).all(1).sum())
            if r.kind == "sid":  # requests whose beams are provably the exact top-k (recsys.retrieval.beam)
                self.counts["sid_beam_requests"] = r.stats["beam_requests"]
                self.counts["sid_beam_certified"] = r.stats["beam_certified"]
            out.append(ids)
        return out

    def rank(self, batch: RequestBatch, union: list[np.ndarray]) -> torch.Tensor:
        """Logits ``[sum m_b, T]`` of every request's union through the cached scorer (plus the prior
        retriever's score of each item for a residual ranker)."""
        dev = batch.cand_offsets.device
        items = np.concatenate(union) if union else np.zeros(0, np.int64)
        offsets = torch.as_tensor(np.concatenate([[0], np.cumsum([u.size for u in union])]), dtype=torch.int64)
        sub = with_request_candidates(batch, torch.as_tensor(items, device=dev),
                                      torch.as_tensor(self.cats[items], device=dev), offsets.to(dev))
        if items.size == 0:
            return torch.zeros(0, len(self.tasks), device=dev)
        logits = self.scorer.score_batch(sub)
        if self.prior is None:
            return logits
        return logits + self.prior.candidate_scores(sub).to(logits.device, logits.dtype)[:, None]

    def rows(self, batch: RequestBatch) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        retrieved = self.retrieve(batch)
        ids, bits = union_candidates(retrieved)
        t1 = time.perf_counter()
        logits = self.rank(batch, ids)
        targets = request_targets(batch, self.target, self.rank_t)
        cols = self._rows(batch, retrieved, ids, bits, logits, targets)
        self.stage_times["retrieve"] += t1 - t0
        self.stage_times["rank"] += time.perf_counter() - t1
        n = sum(u.size for u in ids)
        self.counts["candidates_ranked"] += n
        self.counts["requests_without_candidates"] += sum(u.size == 0 for u in ids)
        self._last_candidates = n
        return cols

    def _rows(self, batch: RequestBatch, retrieved: list[np.ndarray], ids: list[np.ndarray], bits: list[np.ndarray],
              logits: torch.Tensor, targets: list[np.ndarray]) -> dict[str, np.ndarray]:
        own = [f"rank_{n}" for n in self.names]
        out: dict[str, list[np.ndarray]] = {k: [] for k in ("request_id", "user_id", "item_id", "rank", "is_target",
                                                            "bits", *own)}
        scores: list[np.ndarray] = []
        rid, uid = batch.request_id.cpu().numpy(), batch.user_id.cpu().numpy()
        probs = torch.sigmoid(logits.float()).cpu().numpy().astype(np.float32)  # [sum m_b, T]
        start = 0
        for b, (cand, bit, tgt) in enumerate(zip(ids, bits, targets)):
            s = logits[start:start + cand.size, self.rank_t]
            if self.fusion == CascadeFusion.rrf:
                s = rrf_scores(s, cand, [r[b] for r in retrieved], self.rrf_k)
            top = top_k_positions(s, self.top_n).cpu().numpy()
            pos = np.searchsorted(cand, tgt)
            inside = (pos < cand.size) & (cand[np.minimum(pos, max(cand.size - 1, 0))] == tgt) if cand.size else \
                np.zeros(tgt.size, dtype=bool)
            rank = np.full(tgt.size, -1, dtype=np.int64)
            if inside.any():
                rank[inside] = target_ranks(s, torch.as_tensor(pos[inside], device=s.device)).cpu().numpy()
            extra = ~np.isin(tgt, cand[top])
            pos_all = np.concatenate([top, np.where(inside, pos, -1)[extra]])
            items = np.concatenate([cand[top], tgt[extra]])
            n = items.size
            out["request_id"].append(np.full(n, rid[b]))
            out["user_id"].append(np.full(n, uid[b]))
            out["item_id"].append(items)
            out["rank"].append(np.concatenate([np.arange(top.size), rank[extra]]))
            out["is_target"].append(np.isin(items, tgt))
            for name, r in zip(own, retrieved):
                out[name].append(positions_in(r[b], items))
            ok = pos_all >= 0
            out["bits"].append(np.where(ok, bit[np.maximum(pos_all, 0)] if cand.size else 0, 0))
            sc = np.full((n, len(self.tasks)), np.nan, dtype=np.float32)
            sc[ok] = probs[start + pos_all[ok]]
            scores.append(sc)
            start += cand.size
        cols = {k: np.concatenate(v).astype(bool if k == "is_target" else np.int64) for k, v in out.items()}
        bits_col = cols.pop("bits")
        cols["retrieved_by"] = np.array(["+".join(n for j, n in enumerate(self.names) if x >> j & 1) for x in bits_col],
                                        dtype=np.str_)
        cols.update({name: cols.pop(name) for name in own})  # after retrieved_by, before the scores
        sc = np.concatenate(scores)
        for t, task in enumerate(self.tasks):
            cols[f"score_{task}"] = sc[:, t]
        return cols

    def candidates(self, batch: RequestBatch) -> int:
        """Candidates ranked for ``batch``: the union sizes of the last ``rows`` call (the job calls it next)."""
        return self._last_candidates

    def metrics(self, df: pl.DataFrame) -> dict[str, Any]:
        return cascade_metrics(df, self.names, self.retrieve_k, self.k)


__all__ = ["CascadeMode", "positions_in", "union_candidates"]
