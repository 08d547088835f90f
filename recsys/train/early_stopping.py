"""Early stopping on a validation metric (``train.early_stopping``).

Every ``train.eval_every`` steps the loop validates; :class:`EarlyStopper` keeps the best value of
``metric`` (a key of that validation record, e.g. ``valid_auc`` or a retriever's ``valid_recall@10``) and
the step it was reached at, and asks the loop to stop after ``patience`` validations in a row without a
strict improvement. With ``restore_best`` (the default) every new best's model weights are written to
``<output_dir>/best_weights.pt`` (atomically, so a killed run still has them) and put back when training
ends, stopped early or not (the steps after the best validation are not validated ones): the final
checkpoint, the one scoring reads, holds the best weights (its optimizer state is the last step's; a
checkpoint already written at that step is written again). ``report.json`` records the best value, its
step, the stop step and whether the weights were restored. The counters are checkpointed, so a resumed
run stops where the uninterrupted one would and does not restore twice.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recsys.errors import InputError
from recsys.reliability.atomic import atomic_write_bytes
from recsys.train.config import EarlyStoppingConfig, StopMode


class EarlyStopper:
    """See the module docstring; ``enabled`` is False when ``cfg.metric`` is None."""

    def __init__(self, cfg: EarlyStoppingConfig) -> None:
        self.cfg = cfg
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad = 0
        self.stopped_at: int | None = None
        self.restored = False

    @property
    def enabled(self) -> bool:
        return self.cfg.metric is not None

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    def update(self, record: dict[str, Any], step: int) -> None:
        """One validation ``record`` at ``step``: a new best, or one more validation without one."""
        if not self.enabled:
            return
        if self.cfg.metric not in record:
            raise InputError(f"train.early_stopping.metric={self.cfg.metric!r} is not among this model's validation "
                             f"metrics {sorted(record)}")
        value = record[self.cfg.metric]
        if value is None or not math.isfinite(float(value)):
            raise InputError(f"train.early_stopping.metric={self.cfg.metric!r} is undefined ({value}) at step {step}: "
                             "choose a metric the validation split defines")
        value = float(value)
        better = self.best is None or (value > self.best if self.cfg.mode == StopMode.max else value < self.best)
        if better:  # (an extended run's new best: the weights in hand are not the best's any more)
            self.best, self.best_step, self.bad, self.restored = value, step, 0, False
            return
        self.bad += 1
        if self.bad >= self.cfg.patience:
            self.stopped_at = step

    def observe(self, record: dict[str, Any], step: int) -> dict[str, Any]:
        """:meth:`update`, then the new counters (what rank 0 broadcasts to the other ranks)."""
        self.update(record, step)
        return self.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad, "stopped_at": self.stopped_at,
                "restored": self.restored}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.bad, self.stopped_at = int(state.get("bad", 0)), state.get("stopped_at")
        self.restored = bool(state.get("restored", False))

    def should_restore(self, step: int) -> bool:
        """At the end of training: the best weights differ from the weights at ``step`` and are not back yet."""
        return (self.enabled and self.cfg.restore_best and not self.restored and self.best_step is not None
                and self.best_step != step)

    def report(self) -> dict[str, Any]:
        """``report.json``'s ``early_stopping`` entry (None when off)."""
        if not self.enabled:
            return {"early_stopping": None}
        return {"early_stopping": {"metric": self.cfg.metric, "mode": self.cfg.mode.value, "best": self.best,
                                   "best_step": self.best_step, "stopped_at_step": self.stopped_at,
                                   "restored_best": self.restored,
                                   "patience": self.cfg.patience}}


class BestWeights:
    """The model weights of the best validation so far, on disk (``best_weights.pt`` beside the checkpoints)."""

    FILE = "best_weights.pt"

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / self.FILE

    def save(self, model: nn.Module, step: int) -> None:
        buf = io.BytesIO()
        torch.save({"step": step, "model": model.state_dict()}, buf)
        atomic_write_bytes(self.path, buf.getvalue())

    def restore(self, model: nn.Module, step: int) -> None:
        """Load the weights saved at ``step`` into ``model`` (refused when the file holds another step)."""
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as e:
            raise InputError(f"early stopping: cannot read the best weights {self.path} ({type(e).__name__}: {e}); "
                             "rerun with train.early_stopping.restore_best=false to keep the stop step's") from None
        if saved.get("step") != step:
            raise InputError(f"early stopping: {self.path} holds step {saved.get('step')}, not the best step {step}")
        model.load_state_dict(saved["model"])


__all__ = ["BestWeights", "EarlyStopper"]
