"""What the scoring job scores for each request: one *mode* per ``ScoreConfig.mode``.

A mode turns a collated batch of a partition's requests into output columns (``rows``); a partition's
file is the concatenation of its batches' columns. The job driver (``recsys.serving.job``) knows nothing
else about it: it builds the mode with :func:`build_mode`, calls ``rows`` batch by batch, and at the end
asks it for the metrics over every partition on disk (``metrics``) and its summary entries (``info``).
A new mode = a :class:`ScoringMode` implementation plus an entry in :data:`MODES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl
import torch

from recsys.data.batch import RequestBatch
from recsys.data.item_categories import collect_item_categories
from recsys.data.schema import DataSchema
from recsys.errors import InputError
from recsys.retrieval.artifact import LoadedRetriever, load_retriever
from recsys.serving.cascade import CascadeMode
from recsys.serving.catalog import catalog_items, score_catalog
from recsys.serving.config import CascadeFusion, CatalogTarget, ScoreConfig, ScoreMode
from recsys.serving.inputs import ScoreInputs, expand_files
from recsys.serving.ranking import Catalog, RankedRequest, history_items, rank_requests, request_targets
from recsys.serving.scorer import CachedScorer
from recsys.serving.summary import candidate_metrics, catalog_metrics


class ScoringMode(Protocol):
    """One way of scoring a batch of requests into output rows."""

    info: dict[str, Any]
    """Entries of ``summary.json`` describing the mode (candidate set, protocol...)."""

    def rows(self, batch: RequestBatch) -> dict[str, np.ndarray]:
        """Output columns of one batch (equal lengths, one row per written (request, item))."""

    def candidates(self, batch: RequestBatch) -> int:
        """(Request, item) pairs the model scored for ``batch`` (throughput figures)."""

    def metrics(self, df: pl.DataFrame) -> dict[str, Any]:
        """Summary metrics over ``df``, every partition on disk."""

    stage_times: dict[str, float]
    """Seconds spent per stage by this process (``summary.json``'s ``stage_time_s``; the job adds ``write``)."""
    counts: dict[str, int]
    """Counters of this process (summed over ranks into ``summary.json``'s ``mode_counts``)."""


@dataclass
class ModeContext:
    """What a mode is built from."""

    cfg: ScoreConfig
    scorer: CachedScorer
    schema: DataSchema
    inputs: ScoreInputs
    device: torch.device
    dataset_dir: str | None = None
    """The prepared dataset the checkpoint was trained on (None: not recorded); retrievers must match it."""
    score_prior: dict[str, Any] | None = None
    """A residual ranker's retriever (the checkpoint's ``score_prior`` record); None: a plain ranker."""


def _sigmoid(x: torch.Tensor) -> np.ndarray:
    return torch.sigmoid(x.float()).cpu().numpy().astype(np.float32)


class CandidatesMode:
    """The request's own candidates: one row per candidate, input order; scores and labels of every task."""

    stage_times: dict[str, float] = {}
    counts: dict[str, int] = {}

    def __init__(self, ctx: ModeContext) -> None:
        self.scorer, self.tasks = ctx.scorer, list(ctx.schema.tasks)
        self.info: dict[str, Any] = {}

    def rows(self, batch: RequestBatch) -> dict[str, np.ndarray]:
        logits = self.scorer.score_batch(batch)  # [sum C_b, T]
        c = (batch.cand_offsets[1:] - batch.cand_offsets[:-1]).cpu()
        cols = {"request_id": torch.repeat_interleave(batch.request_id.cpu(), c).numpy(),
                "user_id": torch.repeat_interleave(batch.user_id.cpu(), c).numpy(),
                "item_id": batch.cand["item_id"].values().cpu().numpy().astype(np.int64)}
        for t, task in enumerate(self.tasks):
            cols[f"score_{task}"] = _sigmoid(logits[:, t])
        for t, task in enumerate(self.tasks):
            cols[f"label_{task}"] = batch.labels[:, t].cpu().numpy().astype(np.float32)
        return cols

    def candidates(self, batch: RequestBatch) -> int:
        return batch.num_candidates

    def metrics(self, df: pl.DataFrame) -> dict[str, Any]:
        return candidate_metrics(df, self.tasks)


class CatalogMode:
    """Full-catalog ranking (``recsys.serving.ranking``): the top ``catalog.top_k`` items of every request
    (``rank`` 0..K-1) plus one row per target outside the top K (its true rank; -1 outside the candidate set)."""

    stage_times: dict[str, float] = {}
    counts: dict[str, int] = {}

    def __init__(self, ctx: ModeContext) -> None:
        self.cfg, self.scorer, self.tasks, self.kinds = ctx.cfg.catalog, ctx.scorer, list(ctx.schema.tasks), \
            list(ctx.schema.sequences)
        self.catalog, self.rank_t, self.info = served_catalog(ctx)
        self.items = torch.as_tensor(self.catalog.items, device=ctx.device)
        self.cats = torch.as_tensor(self.catalog.cats, device=ctx.device)
        c, m, task = self.cfg, self.catalog.items.size, self.tasks[self.rank_t]
        self.info.update({
            "seen_items_in_candidate_set": not c.exclude_history, "target": c.target.value,
            "protocol": (f"full-catalog ranking of {m} items (item 0, the padding id, excluded) by "
                         f"score_{task}; targets = {c.target.value} of each request (item 0 never one); "
                         "seen items " + ("excluded" if c.exclude_history else "kept") +
                         f"; HR@{c.k}/NDCG@{c.k} averaged over targets; ties by item id")})

    def rows(self, batch: RequestBatch) -> dict[str, np.ndarray]:
        logits = score_catalog(self.scorer, batch, self.items, self.cats)  # [B, M, T]
        targets = request_targets(batch, self.cfg.target, self.rank_t)
        seen = history_items(batch, self.kinds) if self.cfg.exclude_history else None
        ranked = rank_requests(logits[:, :, self.rank_t], self.catalog, targets, seen, self.cfg.top_k)
        return catalog_rows(batch, logits, ranked, self.catalog, self.tasks)

    def candidates(self, batch: RequestBatch) -> int:
        return batch.num_requests * int(self.catalog.items.size)

    def metrics(self, df: pl.DataFrame) -> dict[str, Any]:
        return catalog_metrics(df, self.cfg.k)


def served_catalog(ctx: ModeContext) -> tuple[Catalog, int, dict[str, Any]]:
    """The candidate set of catalog and cascade modes (``catalog.items_file``, categories from the inputs,
    the checkpoint's dataset and ``catalog.category_files``), the ranked task's index, summary entries."""
    cfg, schema, tasks = ctx.cfg, ctx.schema, list(ctx.schema.tasks)
    task = cfg.catalog.rank_task or tasks[0]
    if task not in tasks:
        raise InputError(f"catalog.rank_task={task!r} is not among the model's tasks {tasks}")
    files = ctx.inputs.files + ctx.inputs.dataset_files + expand_files(cfg.catalog.category_files)
    cat_files = sorted(set(files))
    cats = collect_item_categories(cat_files, schema)
    catalog = catalog_items(schema, cfg.catalog.items_file, cats)
    m = catalog.items.size
    info = {"catalog_items": int(m), "category_files": [str(f) for f in cat_files],
            "category_coverage": float(cats.seen[catalog.items].mean()) if m else None,
            "category_conflicts": cats.conflicts, "rank_task": task}
    return catalog, tasks.index(task), info


def cascade_mode(ctx: ModeContext) -> CascadeMode:
    """``mode=cascade``: the served catalog, every retriever of ``cascade.retrievers`` loaded for it."""
    cfg = ctx.cfg.cascade
    catalog, rank_t, info = served_catalog(ctx)
    if len(set(cfg.retrievers)) != len(cfg.retrievers):
        raise InputError(f"cascade.retrievers lists one artifact twice: {list(cfg.retrievers)}")
    retrievers = [load_retriever(p, ctx.schema, catalog, ctx.device, ctx.dataset_dir) for p in cfg.retrievers]
    prior = prior_retriever(ctx, catalog, retrievers)
    mode = CascadeMode(ctx.scorer, list(ctx.schema.tasks), list(ctx.schema.sequences), catalog, retrievers, rank_t,
                       cfg.retrieve_k, cfg.top_n, cfg.exclude_seen, ctx.cfg.catalog.k, cfg.target, cfg.fusion, cfg.rrf_k,
                       prior)
    task = info["rank_task"]
    info.update({
        "retrievers": [{"kind": r.kind, "path": str(r.path), "fingerprint": r.fingerprint} for r in retrievers],
        "retrieve_k": cfg.retrieve_k, "top_n": cfg.top_n, "exclude_seen": cfg.exclude_seen, "target": cfg.target.value,
        "fusion": cfg.fusion.value, "score_prior": None if prior is None else str(prior.path),
        "protocol": (f"retrieve {cfg.retrieve_k} of {catalog.items.size} items per retriever "
                     f"({'+'.join(mode.names)}; history " + ("excluded" if cfg.exclude_seen else "allowed") +
                     "), union re-ranked by " + (f"score_{task}" if cfg.fusion == CascadeFusion.ranker else
                                               f"reciprocal-rank fusion (k {cfg.rrf_k}) of score_{task}'s order and "
                                               "each retriever's") + f", top {cfg.top_n} written; targets = the request's "
                     + (f"candidates labelled 1 on {task} (cascade.target=positives)"
                        if cfg.target == CatalogTarget.positives else
                        "listed candidates whatever their labels (cascade.target=candidates)")
                     + f"; recall@{cfg.retrieve_k} per retriever and of the union over targets; "
                     f"HR@{ctx.cfg.catalog.k}/NDCG@{ctx.cfg.catalog.k} of the cascade over targets (a target no "
                     "retriever found is a miss) and of each retriever's own list; ties by item id")})
    mode.info = info
    return mode


def prior_retriever(ctx: ModeContext, catalog: Catalog, retrievers: list[LoadedRetriever]) -> LoadedRetriever | None:
    """A residual ranker's retriever, as its checkpoint recorded it: one of ``retrievers`` when listed, else
    loaded from the recorded path; refused when its files changed since training (other digests)."""
    rec = ctx.score_prior
    if rec is None:
        return None
    path = Path(rec["retriever"])
    found = next((r for r in retrievers if r.path.resolve() == path), None)
    try:
        prior = found or load_retriever(path, ctx.schema, catalog, ctx.device, ctx.dataset_dir)
    except InputError as e:
        raise InputError(f"checkpoint {ctx.cfg.checkpoint} is a residual ranker over retriever {path} "
                         f"(train.hard_negatives.prior), which cannot be loaded: {e}") from None
    ident = prior.identity
    changed = [k for k in ("state_sha256", "meta_sha256") if ident[k] != rec[k]]
    if changed:
        raise InputError(f"checkpoint {ctx.cfg.checkpoint} is a residual ranker over retriever {path}, whose files "
                         f"changed since the ranker was trained ({', '.join(changed)} differ): retrain the ranker "
                         "on this retriever, or restore the retriever it was trained on")
    return prior


def catalog_rows(batch: RequestBatch, logits: torch.Tensor, ranked: list[RankedRequest], catalog: Catalog,
                 tasks: list[str]) -> dict[str, np.ndarray]:
    """Output columns of ranked requests: per request its top-K rows, then its targets outside the top K
    (inside the candidate set, then outside it). ``logits [B, M, T]``: sigmoid scores of every task
    (NaN for a target outside the candidate set)."""
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("request_id", "user_id", "item_id", "rank", "is_target")}
    scores_out: list[np.ndarray] = []
    rid, uid = batch.request_id.cpu().numpy(), batch.user_id.cpu().numpy()
    for b, r in enumerate(ranked):
        top_items = catalog.items[r.top]
        inside = r.target_pos >= 0
        extra = inside & ~np.isin(r.targets, top_items)  # targets outside the top-K get their own row
        n_out = int((~inside).sum())
        items = np.concatenate([top_items, r.targets[extra], r.targets[~inside]])
        rank = np.concatenate([np.arange(r.top.size), r.target_rank[extra], np.full(n_out, -1)])
        pos = np.concatenate([r.top, r.target_pos[extra], np.full(n_out, -1)])
        n = items.size
        out["request_id"].append(np.full(n, rid[b]))
        out["user_id"].append(np.full(n, uid[b]))
        out["item_id"].append(items)
        out["rank"].append(rank)
        out["is_target"].append(np.isin(items, r.targets))
        sc = np.full((n, len(tasks)), np.nan, dtype=np.float32)
        ok = pos >= 0
        sc[ok] = _sigmoid(logits[b, torch.as_tensor(pos[ok], device=logits.device)])
        scores_out.append(sc)
    cols = {k: np.concatenate(v).astype(bool if k == "is_target" else np.int64) for k, v in out.items()}
    sc = np.concatenate(scores_out)
    for t, task in enumerate(tasks):
        cols[f"score_{task}"] = sc[:, t]
    return cols


MODES: dict[ScoreMode, Callable[[ModeContext], ScoringMode]] = {
    ScoreMode.candidates: CandidatesMode,
    ScoreMode.catalog: CatalogMode,
    ScoreMode.cascade: cascade_mode,
}


def build_mode(ctx: ModeContext) -> ScoringMode:
    """The mode ``ctx.cfg.mode`` names; a residual ranker (``score_prior``) is served by the cascade only."""
    if ctx.score_prior is not None and ctx.cfg.mode != ScoreMode.cascade:
        raise InputError(f"checkpoint {ctx.cfg.checkpoint} is a residual ranker: its logits are trained on top of "
                         f"retriever {ctx.score_prior['retriever']}'s score (train.hard_negatives.prior), which "
                         f"mode={ctx.cfg.mode.value} does not add; serve it with mode=cascade")
    return MODES[ctx.cfg.mode](ctx)


__all__ = ["MODES", "CandidatesMode", "CascadeMode", "CatalogMode", "ModeContext", "ScoringMode", "build_mode", "cascade_mode", "catalog_rows", "served_catalog"]
