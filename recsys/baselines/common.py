"""Pieces every baseline shares: the ``Baseline`` interface and jagged history helpers.

Shape legend: ``B`` requests, ``C`` = sum C_b candidate rows, ``N`` = sum L_b history events
(after the per-kind ``history_cap``), ``E`` embedding width, ``T`` tasks, ``M`` catalog items.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import RequestBatch
from recsys.data.jagged import keep_last, lengths_to_offsets
from recsys.model.config import TargetItems


class Baseline(nn.Module):
    """A comparison model: ``forward(batch) -> logits [C, T]`` like the ranker.

    ``sparse_parameters()`` lists the torchrec table weights (trained by the sparse optimizer);
    ``auxiliary_loss()`` is an extra training loss of the last training forward (None: none).
    """

    tasks: list[str]

    def sparse_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def auxiliary_loss(self) -> torch.Tensor | None:
        return None


def candidate_owner(batch: RequestBatch) -> torch.Tensor:
    """``[C]`` request index of every candidate row."""
    counts = batch.cand_offsets[1:] - batch.cand_offsets[:-1]
    return torch.repeat_interleave(torch.arange(batch.num_requests, device=counts.device), counts)


def positives_in_top_k(batch: RequestBatch, top: torch.Tensor, targets: TargetItems = TargetItems.positives
                       ) -> tuple[int, int]:
    """(hits, targets): how many candidates labelled 1 on task 0 (``targets=candidates``: how many candidates) are
    in their request's row of ``top [B, k]`` (item ids); the next-item validation recall of the retrievers and
    SASRec."""
    if targets == TargetItems.candidates:
        pos = torch.ones(batch.num_candidates, dtype=torch.bool)
    else:
        pos = batch.labels[:, 0].cpu() > 0.5
    owner = candidate_owner(batch).cpu()[pos]
    target = batch.cand["item_id"].values().cpu().long()[pos]
    return int((top.cpu()[owner] == target.unsqueeze(1)).any(1).sum()), int(pos.sum())


def recall_in_top_k(model: nn.Module, batches: Iterable[RequestBatch], device: torch.device, max_batches: int,
                    top_k: Callable[[RequestBatch], torch.Tensor], targets: TargetItems = TargetItems.positives
                    ) -> tuple[int, int]:
    """(hits, targets) of :func:`positives_in_top_k` summed over the first ``max_batches`` of ``batches`` (0 =
    all), each moved to ``device``; ``top_k(batch) -> [B, k]`` item ids; ``targets``: which candidates count.
    ``model`` is in eval mode meanwhile (its mode restored after): the next-item validation loop of the
    retrievers and SASRec."""
    was = model.training
    model.eval()
    found = total = 0
    try:
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            batch = batch.to(device)
            hits, n = positives_in_top_k(batch, top_k(batch), targets)
            found, total = found + hits, total + n
    finally:
        model.train(was)
    return found, total


@dataclass
class History:
    """Every request's events of all kinds merged oldest first (ties: kind order).

    ``item, category, kind``: ``[N]`` int64; ``offsets``: ``[B+1]``.
    Example: kinds (click, like), request 0 clicks [7 @ t=1, 3 @ t=5], likes [9 @ t=2];
    request 1 empty -> item ``[7, 9, 3]``, kind ``[0, 1, 0]``, offsets ``[0, 3, 3]``.
    """

    item: torch.Tensor
    category: torch.Tensor
    kind: torch.Tensor
    offsets: torch.Tensor


def merged_history(batch: RequestBatch, kinds: list[str], cap: int) -> History:
    """The last ``cap`` events of each kind (0 = all), merged by timestamp per request."""
    seq, ts = batch.seq.to_dict(), batch.seq_ts.to_dict()
    b = batch.num_requests
    items, cats, kind_ids, stamps, owners = [], [], [], [], []
    for k_i, k in enumerate(kinds):
        jt = seq[f"{k}.item_id"]
        offsets = lengths_to_offsets(jt.lengths().to(torch.int64))
        rows, kept = keep_last(offsets, cap) if cap else (torch.arange(int(offsets[-1]), device=offsets.device), offsets)
        items.append(jt.values()[rows].to(torch.int64))
        cats.append(seq[f"{k}.category"].values()[rows].to(torch.int64))
        stamps.append(ts[k].values()[rows])
        kind_ids.append(torch.full_like(rows, k_i))
        owners.append(torch.repeat_interleave(torch.arange(b, device=offsets.device), kept[1:] - kept[:-1]))
    owner = torch.cat(owners)
    order = torch.argsort(torch.cat(stamps), stable=True)  # cat is kind-major: kind order breaks ties
    order = order[torch.argsort(owner[order], stable=True)]  # then group by request, keeping time order
    lengths = torch.bincount(owner, minlength=b)
    return History(torch.cat(items)[order], torch.cat(cats)[order], torch.cat(kind_ids)[order],
                   lengths_to_offsets(lengths))


def history_and_candidate_ids(hist: History, batch: RequestBatch) -> KeyedJaggedTensor:
    """One KJT with keys ``hist.item_id``, ``cand.item_id``, ``hist.category``, ``cand.category``
    (per request: the merged history ``[sum L_b]`` and the candidates ``[sum C_b]``)."""
    cand = batch.cand.to_dict()
    h_len = hist.offsets[1:] - hist.offsets[:-1]
    c_len = batch.cand_offsets[1:] - batch.cand_offsets[:-1]
    return KeyedJaggedTensor(
        keys=["hist.item_id", "cand.item_id", "hist.category", "cand.category"],
        values=torch.cat([hist.item, cand["item_id"].values(), hist.category, cand["category"].values()]
                         ).to(torch.int64),
        lengths=torch.cat([h_len, c_len, h_len, c_len]).to(torch.int64))


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with SiLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def segment_softmax(scores: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Softmax of ``scores [P]`` within each segment id ``segment [P]`` (ids in ``0..n_segments-1``).

    Hand-written (torch has no segment softmax; torch_scatter is not a dependency): max-shifted
    exp, normalised by a per-segment ``index_add`` sum.
    """
    peak = torch.full((n_segments,), float("-inf"), device=scores.device, dtype=scores.dtype)
    peak = peak.scatter_reduce(0, segment, scores, reduce="amax", include_self=True)
    e = torch.exp(scores - peak[segment])
    total = torch.zeros(n_segments, device=scores.device, dtype=scores.dtype).index_add(0, segment, e)
    return e / total[segment]
