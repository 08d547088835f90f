"""Task heads and the two ranking losses: multi-task BCE (pointwise) and per-request softmax (listwise)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TaskHeads(nn.Module):
    """Final NS tokens ``[C, N, D]`` -> one logit per task ``[C, T]`` (a shared MLP trunk)."""

    def __init__(self, n_ns: int, d_model: int, hidden: int, n_tasks: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(n_ns * d_model, hidden), nn.SiLU(), nn.Linear(hidden, n_tasks))

    def forward(self, ns: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(ns).flatten(1))


def multitask_bce(logits: torch.Tensor, labels: torch.Tensor, weights: list[float] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits, labels [C, T]`` -> (weighted total loss, per-task mean losses ``[T]``)."""
    per_task = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").mean(0)
    return (per_task * _task_weights(per_task, weights)).sum(), per_task.detach()


def _task_weights(per_task: torch.Tensor, weights: list[float] | None) -> torch.Tensor:
    w = per_task.new_tensor(weights) if weights is not None else torch.ones_like(per_task)
    if w.numel() != per_task.numel():
        raise ValueError(f"{w.numel()} task weights for {per_task.numel()} tasks")
    return w


def multitask_listwise(logits: torch.Tensor, labels: torch.Tensor, cand_offsets: torch.Tensor,
                       weights: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax cross-entropy over each request's candidates, per task (``train.loss=listwise``).

    ``logits, labels [sum C_b, T]``, ``cand_offsets [B+1]``. Request b, task t: with ``n`` positives among
    its ``C_b`` candidates, ``L_bt = -(1/n) sum_{positives c} log softmax(logits_b[:, t])[c]`` (the next item
    against the retriever's near misses, ranked as the cascade ranks them). A request with no positive or
    no negative on a task has nothing to rank there: ``L_bt = 0``. Reduction: the candidate-weighted mean
    ``sum_b C_b L_bt / sum_b C_b`` (the plain mean over requests when all have the same number of
    candidates), so the trainer's scaling by each rank's candidate share gives the exact global mean
    under N ranks, as for the BCE. Returns (weighted total, per-task ``[T]``).
    """
    s, y = logits.float(), (labels > 0).float()
    sizes = cand_offsets.diff()
    b = int(sizes.numel())
    req = torch.repeat_interleave(torch.arange(b, device=s.device), sizes)   # [sum C_b]
    idx = req[:, None].expand_as(s)
    top = s.new_full((b, s.shape[1]), float("-inf")).scatter_reduce(0, idx, s.detach(), "amax")
    lse = torch.log(s.new_zeros(b, s.shape[1]).index_add(0, req, torch.exp(s - top[req]))) + top  # [B, T]
    logp = s - lse[req]
    n_pos = y.new_zeros(b, s.shape[1]).index_add(0, req, y)
    ranked = (n_pos > 0) & (n_pos < sizes[:, None])                         # something to rank
    per_req = -y.new_zeros(b, s.shape[1]).index_add(0, req, y * logp) / n_pos.clamp(min=1)
    per_task = (per_req * ranked * sizes[:, None]).sum(0) / max(int(sizes.sum()), 1)
    return (per_task * _task_weights(per_task, weights)).sum(), per_task.detach()
