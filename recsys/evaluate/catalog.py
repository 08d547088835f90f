"""Full-catalog ranking for every model family with one protocol.

For each request every catalog item (ids ``1 .. num_items-1``, ascending) is scored; items are
ordered by score, ties by ascending id; the 0-based rank of each relevant item is
``#{score > s_t} + #{score == s_t, id < t}`` (``recsys.serving.catalog.target_ranks``), and HR@K /
NDCG@K are averaged over relevant items. What "score" means per family:

* OneTrans: the first task's logit, through the serving path (stage 1 once per request, the
  catalog in chunks against the cached prefix: ``recsys.serving.catalog.score_catalog``);
* SASRec: its next-item score ``u . e_i`` (the model's ranking output, :meth:`SASRecModel.catalog_scores`);
* other baselines: the first task's logit of ``model(batch)`` with the catalog as candidates, in chunks.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from recsys.baselines import SASRecModel
from recsys.data.batch import RequestBatch
from recsys.data.jagged import offsets_from_lengths
from recsys.model.ranker import OneTransRanker
from recsys.serving.catalog import score_catalog, target_ranks, with_candidates
from recsys.serving.config import CatalogTarget
from recsys.serving.scorer import CachedScorer


@torch.no_grad()
def catalog_scores(model: nn.Module, batch: RequestBatch, items: torch.Tensor, cats: torch.Tensor,
                   chunk: int) -> torch.Tensor:
    """Ranking scores ``[B, M]`` of ``items [M]`` (categories ``cats [M]``) for every request of ``batch``."""
    if isinstance(model, OneTransRanker):
        return score_catalog(CachedScorer(model, None, chunk), batch, items, cats)[:, :, 0]
    if isinstance(model, SASRecModel):
        return model.catalog_scores(batch, items)
    b, m = batch.num_requests, items.numel()
    per_call = max(1, chunk // max(1, b))  # items per call, so a call has about `chunk` candidate rows
    out = torch.empty(b, m, device=items.device)
    for i0 in range(0, m, per_call):
        i1 = min(m, i0 + per_call)
        out[:, i0:i1] = model(with_candidates(batch, items[i0:i1], cats[i0:i1]))[:, 0].view(b, i1 - i0)
    return out


def request_targets(batch: RequestBatch, target: CatalogTarget) -> list[np.ndarray]:
    """Per request, the relevant item ids among its listed candidates (see ``CatalogTarget``)."""
    items = batch.cand["item_id"].values().cpu().numpy()
    pos = batch.labels[:, 0].cpu().numpy() > 0.5
    off = batch.cand_offsets.cpu().numpy()
    out = []
    for b in range(batch.num_requests):
        sel = items[off[b]:off[b + 1]]
        if target == CatalogTarget.positives:
            sel = sel[pos[off[b]:off[b + 1]]]
        out.append(np.unique(sel[sel > 0]))
    return out


def history_items(batch: RequestBatch, kinds: list[str]) -> list[np.ndarray]:
    """Per request, the item ids of its (loader-truncated) history over all kinds."""
    seq = batch.seq.to_dict()
    per_kind = []
    for k in kinds:
        jt = seq[f"{k}.item_id"]
        off = offsets_from_lengths(jt.lengths().cpu().numpy())
        vals = jt.values().cpu().numpy()
        per_kind.append([vals[off[b]:off[b + 1]] for b in range(batch.num_requests)])
    return [np.concatenate([p[b] for p in per_kind]) for b in range(batch.num_requests)]


def catalog_ranks(model: nn.Module, batches: Iterable[RequestBatch], num_items: int, category: np.ndarray,
                  kinds: list[str], target: CatalogTarget, exclude_history: bool, chunk: int,
                  device: torch.device, progress: bool = False) -> tuple[np.ndarray, int]:
    """(0-based rank of every relevant item ``[n_targets]``, requests ranked).

    ``category [num_items]``: item id -> category id (the candidates' side feature).
    Requests without a relevant item are skipped (they have nothing to hit).
    """
    model.eval()
    items = torch.arange(1, num_items, device=device)
    cats = torch.as_tensor(category[1:num_items], device=device)
    ranks: list[np.ndarray] = []
    n_req = 0
    for batch in tqdm(batches, disable=not progress, desc="catalog", unit="batch"):
        batch = batch.to(device)
        scores = catalog_scores(model, batch, items, cats, chunk).float()  # [B, M]
        seen = history_items(batch, kinds) if exclude_history else None
        for b, tgt in enumerate(request_targets(batch, target)):
            if tgt.size == 0:
                continue
            s = scores[b]
            if seen is not None:
                drop = np.setdiff1d(seen[b][seen[b] > 0], tgt)
                s = s.clone()
                s[torch.as_tensor(drop - 1, device=device)] = float("-inf")
            ranks.append(target_ranks(s, torch.as_tensor(tgt - 1, device=device)).cpu().numpy())
            n_req += 1
    return (np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)), n_req
