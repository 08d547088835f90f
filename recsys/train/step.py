"""One training step, the same for one process and for N ranks (``recsys.dist.strategy``).

:meth:`Trainer.step` takes one batch (this rank's part of the global batch) and applies one update, or
none; it is :meth:`Trainer.forward` then :meth:`Trainer.update`, the two halves torchrec's
``TrainPipelineSparseDist`` calls in its own order (``recsys.dist.pipeline``, ``dist.pipeline``).

Order: forward; loss of this rank's candidates scaled by its share of the *global* candidate count
(all-reduced; 1 in one process, so the loss is the plain mean); global loss and per-task losses
all-reduced. The non-finite guard decides on the global loss *before* backward, so every rank skips
alike and nothing is updated: under N ranks the sparse optimizer runs fused inside the tables'
backward, so a skip must be decided before it. After backward the gradients are checked (one process:
tables and dense; N ranks: dense, agreed by all-reduce); see :meth:`Trainer.step` for what a
non-finite gradient does in each case (docs/reliability.md, "Non-finite losses and gradients").

Loss: the task BCE of ``model(batch)``'s logits (or, with ``listwise``, the softmax over each request's
candidates: ``recsys.model.heads.multitask_listwise``), unless the model brings its own loss:
``model.training_loss(batch) -> (loss, per_task, graph tensor)`` (the two-tower retriever,
``recsys.retrieval.two_tower_model``; docs/retrieval.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from recsys.baselines.common import Baseline
from recsys.data.batch import RequestBatch
from recsys.dist.strategy import Optimizers, SingleProcess
from recsys.errors import InputError
from recsys.model.heads import multitask_bce, multitask_listwise
from recsys.reliability.faults import fault_now
from recsys.reliability.guards import grads_finite


@dataclass
class StepResult:
    loss: float
    """Global-batch loss (mean over all ranks' candidates, plus a baseline's auxiliary loss), equal on every rank."""
    per_task: list[float]
    """Global per-task mean losses ``[T]``."""
    candidates: int
    """Candidates in the global batch."""
    requests: int
    """Requests in the global batch."""
    lr: float
    """Dense learning rate this step used (or would have used, when skipped)."""
    skipped: str | None = None
    """None: applied; ``"loss"`` / ``"grad"``: nothing was updated (non-finite loss / gradient)."""


@dataclass
class Forward:
    """What :meth:`Trainer.forward` hands to :meth:`Trainer.update` (one batch's forward and global stats)."""

    loss: torch.Tensor
    """This rank's share of the global loss (scalar, with its graph)."""
    stats: torch.Tensor
    """Global ``[1 + T]``: loss, per-task losses (all-reduced)."""
    counts: torch.Tensor
    """Global ``[2]`` float64: candidates, requests."""
    logits: torch.Tensor
    """This rank's ``[sum C_b, T]``."""
    lr: float
    """Dense learning rate of this step."""


class NonFiniteTableUpdate(FloatingPointError):
    """N ranks: a finite loss gave non-finite gradients after the fused table update already ran."""


@dataclass
class Trainer:
    """The module being trained (plain, or DMP under N ranks), its optimizers and the step settings."""

    model: nn.Module
    par: SingleProcess
    opt: Optimizers
    task_weights: list[float] | None = None
    bf16: bool = False
    clip_grad_norm: float = 0.0
    listwise: bool = False
    """Rank each request's candidates with a softmax (``train.loss=listwise``) instead of the per-candidate BCE."""

    def __post_init__(self) -> None:
        if self.listwise and getattr(self.model, "training_loss", None) is not None:
            raise InputError(f"train.loss=listwise is a ranker's loss; {type(self.model).__name__} brings its own "
                             "training loss (a retriever): leave train.loss at bce")

    def _loss(self, batch: RequestBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(this rank's share of the global loss, global stats ``[1 + T]``, global counts ``[2]``, logits)."""
        # One process: the counts stay on the host (Python ints from the loader), so reading them is no device sync
        counts = self.par.sum_(torch.tensor([batch.num_candidates, batch.num_requests], dtype=torch.float64,
                                            device=self.par.device if self.par.world > 1 else "cpu"))
        share = batch.num_candidates / float(counts[0])  # exactly 1.0 in one process
        own = getattr(self.model, "training_loss", None)  # a model with its own loss (the two-tower retriever)
        with torch.autocast(self.par.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = own(batch) if own is not None else batch.with_prior(self.model(batch))
        if own is not None:
            loss, per_task, logits = out
        elif self.listwise:
            loss, per_task, logits = *multitask_listwise(out, batch.labels, batch.cand_offsets, self.task_weights), out
        else:
            loss, per_task, logits = *multitask_bce(out, batch.labels, self.task_weights), out
        if isinstance(self.model, Baseline) and (aux := self.model.auxiliary_loss()) is not None:
            loss = loss + aux  # e.g. SASRec's next-item softmax (one process only); per_task stays the task BCE
        loss = loss * share
        stats = self.par.sum_(torch.cat([loss.detach().reshape(1).float(), per_task.detach().float() * share]))
        return loss, stats, counts, logits

    def step(self, batch: RequestBatch) -> StepResult:
        """Forward, backward and update on this rank's ``batch``; every rank must call it together.

        Non-finite global loss: no backward, nothing updated on any rank (``skipped="loss"``). Non-finite
        gradient with a finite loss: one process drops the gradients, nothing updated (``"grad"``); N ranks
        raise :class:`NonFiniteTableUpdate` before the dense step: the fused table update already ran inside
        backward and cannot be taken back, so the run stops and is resumed from its last checkpoint.
        """
        return self.update(self.forward(batch.to(self.par.device)))

    def forward(self, batch: RequestBatch) -> Forward:
        """The first half of :meth:`step` on a batch already on the device (a pipeline calls it on its batch)."""
        lr = self.opt.sched.get_last_lr()[0]
        return Forward(*self._loss(batch), lr)

    def update(self, fwd: Forward) -> StepResult:
        """The second half of :meth:`step`: guard, backward, gradient checks, clipping, optimizer steps."""
        opt, loss, stats, counts, logits = self.opt, fwd.loss, fwd.stats, fwd.counts, fwd.logits
        result = StepResult(float(stats[0]), stats[1:].tolist(), int(counts[0]), int(counts[1]), fwd.lr)
        opt.zero_grad()
        if not math.isfinite(result.loss):  # every rank holds the same global loss: all skip
            result.skipped = "loss"
            return result
        if fault_now("train.nonfinite_grad"):
            logits.register_hook(lambda g: g * float("inf"))  # finite loss, Inf / NaN gradients downstream
        loss.backward()  # N ranks: the tables are updated here (fused)
        self.par.after_backward(opt)
        if not self.par.all_finite(grads_finite(opt.checked)):
            opt.zero_grad()
            if self.par.fused_tables:
                raise NonFiniteTableUpdate(
                    f"non-finite gradient with a finite loss ({result.loss}) under {self.par.world} ranks: the "
                    "embedding tables' fused optimizer already applied this step inside backward, so it cannot be "
                    "skipped; the dense update was not applied and training stops. Resume from the last "
                    "checkpoint with a lower learning rate or gradient clipping, or check the input features")
            result.skipped = "grad"
            return result
        if self.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(opt.dense_params, self.clip_grad_norm)
        if opt.sparse is not None:
            opt.sparse.step()
        opt.dense.step()
        opt.sched.step()
        return result
