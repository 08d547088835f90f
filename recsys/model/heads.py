"""Task heads and the multi-task BCE loss."""

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
    w = per_task.new_tensor(weights) if weights is not None else torch.ones_like(per_task)
    if w.numel() != per_task.numel():
        raise ValueError(f"{w.numel()} task weights for {per_task.numel()} tasks")
    return (per_task * w).sum(), per_task.detach()
