"""Full-catalog ranking: score every catalog item for each request, keep the top K, rank the targets.

Shape legend: ``B`` requests, ``M`` catalog items, ``T`` tasks, ``K`` items written per request.

Item -> category. The model's candidate NS tokens need each item's category. Request rows
carry ``(item_id, category)`` pairs in the candidate columns and in every behaviour sequence;
:func:`collect_item_categories` reads those columns of the given files (the job passes the
inputs and, when scoring the checkpoint's own dataset, all of its splits) and keeps the last
category seen per item. Items never seen get category 0 (the reserved *unknown* id the
tables already have); the job reports the coverage and any item seen with two categories.

Scoring. Stage 1 (the user prefix) runs once per request through the user cache; then the
catalog is walked in chunks: a chunk of items becomes every request's candidate list, the
tokenizer builds their NS tokens (it also re-tokenizes the S events, a small cost next to
the layers) and stage 2 scores them against the cached prefix. Only the scores are kept
(``[B, M, T]`` floats), never per-candidate copies of anything history-sized.

Ranks. Items are ordered by the ranking task's score, best first, ties by ascending item
id; the 0-based rank of a target item is ``#{score > s_t} + #{score == s_t, id < t}`` over
the candidate set, consistent with the written top-K lists.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import RequestBatch
from recsys.data.parquet_io import open_parquet, read_parquet_table
from recsys.data.schema import DataSchema
from recsys.serving.scorer import CachedScorer, score_in_chunks
from recsys.serving.state import states_to_prefix


@dataclass
class ItemCategories:
    """``category[item_id]`` for ``item_id`` in ``0 .. num_items-1`` (0 = unknown) and how it was found."""

    category: np.ndarray
    """[num_items] int64."""
    seen: np.ndarray
    """[num_items] bool: the item appeared in some file."""
    conflicts: int
    """Items seen with more than one category (the last one seen is kept)."""


def collect_item_categories(files: list[Path], schema: DataSchema) -> ItemCategories:
    """Item -> category from the candidate and behaviour columns of request-row files (see module doc)."""
    n = schema.num_items
    category = np.zeros(n, dtype=np.int64)
    seen = np.zeros(n, dtype=bool)
    conflict = np.zeros(n, dtype=bool)
    pairs = [("cand_item_id", "cand_category")] + [
        (schema.seq_col(k, "item_id"), schema.seq_col(k, "category")) for k in schema.sequences]
    for f in files:
        pf = open_parquet(f)  # a damaged file: an InputError naming it (and the row group), not a pyarrow error
        names = set(pf.schema_arrow.names)
        for item_col, cat_col in pairs:
            if item_col not in names or cat_col not in names:
                continue
            table = read_parquet_table(f, [item_col, cat_col], pf)
            items = pc.list_flatten(table.column(item_col)).to_numpy().astype(np.int64)
            cats = pc.list_flatten(table.column(cat_col)).to_numpy().astype(np.int64)
            ok = (items >= 0) & (items < n) & (cats >= 0) & (cats < schema.num_categories)
            items, cats = items[ok], cats[ok]
            before = category[items]
            conflict[items[seen[items] & (before != cats)]] = True
            category[items] = cats
            seen[items] = True
    return ItemCategories(category, seen, int(conflict.sum()))


def catalog_items(schema: DataSchema, items_file: str | None, categories: ItemCategories
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The candidate set: ``(item ids [M], categories [M])``, ascending ids, unique.

    ``items_file``: Parquet with ``item_id`` (and optionally ``category``, which then wins over
    the collected map); None: every id ``1 .. num_items-1``.
    """
    if items_file is None:
        items = np.arange(1, schema.num_items, dtype=np.int64)
        return items, categories.category[items]
    table = read_parquet_table(items_file)
    if "item_id" not in table.column_names:
        raise ValueError(f"{items_file}: needs an item_id column")
    items = table.column("item_id").to_numpy().astype(np.int64)
    if ((items < 1) | (items >= schema.num_items)).any():
        raise ValueError(f"{items_file}: item ids must be in 1..{schema.num_items - 1}")
    cats = (table.column("category").to_numpy().astype(np.int64) if "category" in table.column_names
            else categories.category[items])
    items, first = np.unique(items, return_index=True)
    return items, cats[first]


def with_candidates(batch: RequestBatch, items: torch.Tensor, cats: torch.Tensor) -> RequestBatch:
    """The batch with every request's candidates replaced by the same ``items [m]`` (labels zero)."""
    b, m = batch.num_requests, items.numel()
    lengths = torch.full((b,), m, dtype=torch.int64, device=items.device)
    cand = KeyedJaggedTensor(keys=["item_id", "category"], values=torch.cat([items.repeat(b), cats.repeat(b)]),
                             lengths=torch.cat([lengths, lengths]))
    offsets = torch.arange(b + 1, dtype=torch.int64, device=items.device) * m
    labels = torch.zeros(b * m, batch.labels.shape[1], device=batch.labels.device)
    return replace(batch, cand=cand, cand_offsets=offsets, labels=labels, true_prob=None)


@torch.no_grad()
def score_catalog(scorer: CachedScorer, batch: RequestBatch, items: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, M, T]`` of every catalog item for every request of ``batch``.

    Stage 1 once per request (through the scorer's cache); the catalog in chunks of about
    ``scorer.candidate_chunk`` candidate rows per call.
    """
    model = scorer.model
    b, m = batch.num_requests, items.numel()
    per_call = max(1, scorer.candidate_chunk // max(1, b))  # items per tokenizer call
    out = torch.empty(b, m, len(model.tasks), device=items.device)
    prefix = None
    for i0 in range(0, m, per_call):
        i1 = min(m, i0 + per_call)
        sub = with_candidates(batch, items[i0:i1], cats[i0:i1])
        tok = model.tokenizer(sub)
        if prefix is None:
            prefix = states_to_prefix(scorer.user_states(sub, tok))
        logits = score_in_chunks(model, prefix, tok.ns_tokens, tok.cand_offsets, scorer.candidate_chunk)
        out[:, i0:i1] = logits.view(b, i1 - i0, -1)
    return out


def target_ranks(scores: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
    """0-based ranks of targets. ``scores [M]`` of one request, ``target_index [t]`` catalog positions.

    Rank = #{score > s_t} + #{score == s_t and position < target's}: ties go to the lower item id
    (catalog positions are in ascending item id), matching :func:`top_k`.
    """
    s_t = scores[target_index]  # [t]
    higher = (scores[None, :] > s_t[:, None]).sum(1)
    pos = torch.arange(scores.numel(), device=scores.device)
    tied_before = ((scores[None, :] == s_t[:, None]) & (pos[None, :] < target_index[:, None])).sum(1)
    return higher + tied_before


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Catalog positions of the ``k`` best scores of ``[M]`` (best first, ties by ascending position)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]
