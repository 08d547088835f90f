"""The loop's counters, as checkpoints store them (plain ints and floats: ``weights_only``-safe)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Progress:
    step: int = 0
    """Optimizer updates applied (skipped steps not counted)."""
    epoch: int = 0
    batch_in_epoch: int = 0
    """Batches of ``epoch`` consumed (applied or skipped): a resume skips that many."""
    train_time: float = 0.0
    """Seconds in the step (reading and collating excluded); this rank's."""
    samples: int = 0
    """Candidates trained on (global batch)."""
    requests: int = 0
    """Requests trained on (global batch)."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load(self, state: dict[str, Any]) -> None:
        for k in asdict(self):
            setattr(self, k, type(getattr(self, k))(state[k]))
