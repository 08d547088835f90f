"""Full-catalog scoring: the candidate set, its item categories, every catalog item scored for each request.

Shape legend: ``B`` requests, ``M`` catalog items, ``T`` tasks.

Item -> category. The model's candidate NS tokens need each item's category:
``recsys.data.item_categories.collect_item_categories`` reads the job's inputs and, when scoring the
checkpoint's own dataset, all of its splits. Items never seen get category 0 (the reserved *unknown* id
the tables already have); the job reports the coverage and any item seen with two categories.

Scoring. Stage 1 (the user prefix) runs once per request through the user cache; then the
catalog is walked in chunks: a chunk of items becomes every request's candidate list, the
tokenizer builds their NS tokens (it also re-tokenizes the S events, a small cost next to
the layers) and stage 2 scores them against the cached prefix. Only the scores are kept
(``[B, M, T]`` floats), never per-candidate copies of anything history-sized.

Ranking (targets, item 0, seen items, ties): ``recsys.serving.ranking``, the one implementation
the job and ``recsys.evaluate`` share. :func:`ranking_scores` gives the ranked score of every model
family (the ranker through the cached path above, SASRec's next-item score, other baselines' task logit).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from recsys.baselines import SASRecModel
from recsys.data.batch import RequestBatch
from recsys.data.candidates import with_request_candidates
from recsys.data.item_categories import ItemCategories
from recsys.data.parquet_io import read_parquet_table
from recsys.data.schema import DataSchema
from recsys.errors import InputError
from recsys.model.ranker import OneTransRanker
from recsys.serving.ranking import Catalog
from recsys.serving.scorer import CachedScorer, score_in_chunks
from recsys.serving.state import states_to_prefix


def catalog_items(schema: DataSchema, items_file: str | None, categories: ItemCategories) -> Catalog:
    """The candidate set: item ids ``[M]`` (ascending, unique, never 0: the padding id) and their categories.

    ``items_file``: Parquet with ``item_id`` (and optionally ``category``, which then wins over
    the collected map); None: every id ``1 .. num_items-1``.
    """
    if items_file is None:
        items = np.arange(1, schema.num_items, dtype=np.int64)
        return Catalog(items, categories.category[items], schema.num_items)
    table = read_parquet_table(items_file)
    if "item_id" not in table.column_names:
        raise InputError(f"catalog.items_file={items_file}: needs an item_id column")
    items = table.column("item_id").to_numpy().astype(np.int64)
    if ((items < 1) | (items >= schema.num_items)).any():
        raise InputError(f"catalog.items_file={items_file}: item ids must be in 1..{schema.num_items - 1} (0 is the "
                         "padding / unknown id, never a real item)")
    cats = (table.column("category").to_numpy().astype(np.int64) if "category" in table.column_names
            else categories.category[items])
    items, first = np.unique(items, return_index=True)
    return Catalog(items, cats[first], schema.num_items)


def with_candidates(batch: RequestBatch, items: torch.Tensor, cats: torch.Tensor) -> RequestBatch:
    """The batch with every request's candidates replaced by the same ``items [m]`` (labels zero)."""
    b, m = batch.num_requests, items.numel()
    offsets = torch.arange(b + 1, dtype=torch.int64, device=items.device) * m
    return with_request_candidates(batch, items.repeat(b), cats.repeat(b), offsets)


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


@torch.no_grad()
def ranking_scores(model: nn.Module, batch: RequestBatch, items: torch.Tensor, cats: torch.Tensor, task: int,
                   chunk: int) -> torch.Tensor:
    """The ranked score ``[B, M]`` of ``items [M]`` (categories ``cats [M]``) for every request, any model family:

    * OneTrans: task ``task``'s logit through the serving path (:func:`score_catalog`, no cross-request cache);
    * SASRec: its next-item score ``u . e_i`` (what it is trained to rank; ``task`` does not apply);
    * other baselines: task ``task``'s logit of ``model(batch)`` with the catalog as candidates, about
      ``chunk`` candidate rows per call.
    """
    if isinstance(model, OneTransRanker):
        return score_catalog(CachedScorer(model, None, chunk), batch, items, cats)[:, :, task]
    if isinstance(model, SASRecModel):
        return model.catalog_scores(batch, items)
    b, m = batch.num_requests, items.numel()
    per_call = max(1, chunk // max(1, b))  # items per call, so a call has about `chunk` candidate rows
    out = torch.empty(b, m, device=items.device)
    for i0 in range(0, m, per_call):
        i1 = min(m, i0 + per_call)
        out[:, i0:i1] = model(with_candidates(batch, items[i0:i1], cats[i0:i1]))[:, task].view(b, i1 - i0)
    return out
