"""Full-catalog ranking of the evaluation report, for every model family, with the scoring job's protocol.

The ranking itself (candidate set without item 0, targets, seen items, ties by item id, 0-based ranks)
is ``recsys.serving.ranking``, the one implementation ``python -m recsys.score mode=catalog`` uses too;
the ranked score per family is ``recsys.serving.catalog.ranking_scores`` (the ranker through the
KV-cached serving path, SASRec's next-item score, other baselines' task logit). HR@K / NDCG@K are
averaged over targets.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from recsys.data.batch import RequestBatch
from recsys.serving.catalog import ranking_scores
from recsys.serving.config import CatalogTarget
from recsys.serving.ranking import Catalog, history_items, rank_requests, request_targets


def catalog_ranks(model: nn.Module, batches: Iterable[RequestBatch], catalog: Catalog, kinds: list[str],
                  target: CatalogTarget, exclude_history: bool, chunk: int, device: torch.device,
                  progress: bool = False, rank_task: int = 0) -> tuple[np.ndarray, int]:
    """(0-based rank of every target ``[n_targets]``, requests ranked), requests in batch order.

    ``rank_task``: index of the task whose score ranks the catalog and whose labels define positives.
    Requests without a target are skipped (they have nothing to hit).
    """
    model.eval()
    items = torch.as_tensor(catalog.items, device=device)
    cats = torch.as_tensor(catalog.cats, device=device)
    ranks: list[np.ndarray] = []
    n_req = 0
    for batch in tqdm(batches, disable=not progress, desc="catalog", unit="batch"):
        batch = batch.to(device)
        scores = ranking_scores(model, batch, items, cats, rank_task, chunk).float()  # [B, M]
        targets = request_targets(batch, target, rank_task)
        seen = history_items(batch, kinds) if exclude_history else None
        for r in rank_requests(scores, catalog, targets, seen, top_k=0):
            if r.targets.size:
                ranks.append(r.target_rank[r.target_pos >= 0])
                n_req += 1
    return (np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)), n_req
