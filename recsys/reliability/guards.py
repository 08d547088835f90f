"""Skip-and-count guard against non-finite losses and gradients.

Policy (``train.max_consecutive_nonfinite``): a step whose loss, or any gradient (dense *and*
embedding tables), is NaN/Inf applies no update at all: gradients are dropped, neither optimizer
nor the LR scheduler steps, the step counter does not advance, but the batch is consumed. The
skip is counted by cause; once more than ``max_consecutive`` steps in a row were skipped training
stops with :class:`FloatingPointError` naming the step, epoch and batch. A finite step resets the
run-length count (not the totals).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


def grads_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    """True when every existing gradient is finite (one fused max-abs pass; NaN propagates through max)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf)))


@dataclass
class NonFiniteGuard:
    """Counts skipped steps; raises after more than ``max_consecutive`` in a row (0 = at the first)."""

    max_consecutive: int
    skipped_loss: int = 0
    """Steps skipped because the loss was NaN/Inf (backward not run)."""
    skipped_grad: int = 0
    """Steps skipped because the loss was finite but a gradient was not."""
    consecutive: int = 0
    """Current run of skipped steps."""
    longest_run: int = 0
    last: dict[str, int] = field(default_factory=dict)
    """Where the last skip happened: step (updates applied before it), epoch, batch."""

    def __post_init__(self) -> None:
        if self.max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {self.max_consecutive}")

    def skip(self, cause: str, *, step: int, epoch: int, batch: int, value: float | None = None) -> None:
        """Count one skipped step (``cause`` "loss" or "grad"); raise when the run is too long."""
        if cause == "loss":
            self.skipped_loss += 1
        elif cause == "grad":
            self.skipped_grad += 1
        else:
            raise ValueError(f"cause must be 'loss' or 'grad', got {cause!r}")
        self.consecutive += 1
        self.longest_run = max(self.longest_run, self.consecutive)
        self.last = {"step": step, "epoch": epoch, "batch": batch}
        if self.consecutive > self.max_consecutive:
            what = f"loss {value}" if cause == "loss" else "gradient"
            raise FloatingPointError(
                f"non-finite {what} at step {step} (epoch {epoch}, batch {batch}): {self.consecutive} step(s) in a "
                f"row skipped, more than train.max_consecutive_nonfinite={self.max_consecutive}; "
                f"{self.skipped_loss} loss / {self.skipped_grad} gradient skip(s) in this run. Lower the learning "
                "rate, check the input features, or enable gradient clipping.")

    def ok(self) -> None:
        """A step was applied: the run of skips ends."""
        self.consecutive = 0

    def report(self) -> dict[str, Any]:
        """Counts for report.json."""
        return {"nonfinite_skipped_steps": self.skipped_loss + self.skipped_grad,
                "nonfinite_loss_steps": self.skipped_loss, "nonfinite_grad_steps": self.skipped_grad,
                "nonfinite_longest_run": self.longest_run}

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "max_consecutive"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, dict(v) if k == "last" else int(v))
