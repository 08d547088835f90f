"""A batch with other candidates: the scoring job's catalog chunks and retrieved sets, training-time hard
negatives. The requests' histories and features are kept; ``id_features`` / ``sizes`` are derived again."""

from __future__ import annotations

from dataclasses import replace

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import RequestBatch


def with_request_candidates(batch: RequestBatch, items: torch.Tensor, cats: torch.Tensor, offsets: torch.Tensor,
                            labels: torch.Tensor | None = None, prior: torch.Tensor | None = None) -> RequestBatch:
    """The batch with request ``b``'s candidates replaced by ``items[offsets[b]:offsets[b+1]]`` (jagged
    ``[sum m_b]``, categories ``cats [sum m_b]``, ``offsets [B+1]``); ``labels [sum m_b, T]`` (None: zero).
    ``prior [sum m_b]``: the new candidates' logit offsets (None: none). The generator's true probabilities
    and any old prior are dropped (they belong to the old candidates)."""
    lengths = offsets[1:] - offsets[:-1]
    cand = KeyedJaggedTensor(keys=["item_id", "category"], values=torch.cat([items, cats]),
                             lengths=torch.cat([lengths, lengths]))
    if labels is None:
        labels = torch.zeros(items.numel(), batch.labels.shape[1], device=batch.labels.device)
    return replace(batch, cand=cand, cand_offsets=offsets, labels=labels, true_prob=None, prior=prior)


__all__ = ["with_request_candidates"]
