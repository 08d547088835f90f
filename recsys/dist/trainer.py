"""One distributed training step: sharded tables + fused sparse optimizer, DDP dense, exact global loss.

Gradient bookkeeping (what makes N ranks equal one process on the same global batch):

* the loss a process would minimise on the global batch is the mean over its ``N`` candidates,
  ``L = (1/N) sum_i l_i``. Rank ``r`` backpropagates its share ``L_r = (1/N) sum_{i in r} l_i``
  (``N`` comes from an all-reduce of the candidate counts, so ranks may hold different numbers
  of candidates), and ``sum_r L_r = L``;
* sharded tables: torchrec's all-to-all backward *sums* every rank's row gradients into the
  owning shard, so the fused update sees ``dL/dE`` exactly;
* dense parameters: DDP *averages* over ranks, giving ``dL/dtheta / W``; the step multiplies
  the dense gradients by ``W`` before clipping, so clipping and AdamW see ``dL/dtheta``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys.data.batch import RequestBatch
from recsys.dist.checkpoint import DistCheckpointer
from recsys.dist.config import DistConfig
from recsys.dist.sharding import shard_ranker
from recsys.model.heads import multitask_bce
from recsys.model.ranker import OneTransRanker
from recsys.train.config import DenseOptimizer, OptimConfig


@dataclass
class StepResult:
    loss: float
    """Global-batch loss (mean over all ranks' candidates), equal on every rank."""
    per_task: list[float]
    """Global per-task mean losses ``[T]``."""
    candidates: int
    """Candidates in the global batch."""


def _dense_factory(oc: OptimConfig) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if DenseOptimizer(oc.dense) == DenseOptimizer.adamw:
            return torch.optim.AdamW(params, lr=oc.dense_lr, weight_decay=oc.weight_decay)
        return torch.optim.RMSprop(params, lr=oc.dense_lr, weight_decay=oc.weight_decay)
    return make


class DistTrainer:
    """Owns the sharded model and its optimizers; :meth:`step` is one synchronous training step.

    ``model``: the ranker, built with the same seed on every rank: tables on meta
    (``recsys.dist.meta_init.build_meta_model``: only this rank's shards are ever allocated) or a full
    plain model (its weights are copied into the shards); see ``recsys.dist.sharding.shard_ranker``. ``lr_lambda``: dense learning-rate multiplier per step (warm-up/decay).
    """

    def __init__(self, model: OneTransRanker, oc: OptimConfig, dcfg: DistConfig, device: torch.device,
                 lr_lambda: Callable[[int], float], task_weights: list[float] | None = None,
                 bf16: bool = False) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DistTrainer needs an initialised process group (run under torchrun)")
        self.world_size = dist.get_world_size()
        self.device, self.oc, self.task_weights, self.bf16 = device, oc, task_weights, bf16
        self.model, self.plan = shard_ranker(model, dcfg, device, oc.sparse, oc.sparse_lr)
        dense = dict(in_backward_optimizer_filter(self.model.named_parameters(), include=False))
        self.dense_params = list(dense.values())
        self.dense_opt = KeyedOptimizerWrapper(dense, _dense_factory(oc))
        # fused (sharded tables, stepped inside backward) + dense, one keyed state_dict for checkpoints
        self.optimizer = CombinedOptimizer([("sparse", self.model.fused_optimizer), ("dense", self.dense_opt)])
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.dense_opt, lr_lambda)

    def sharded_state(self) -> dict[str, Any]:
        """What a distributed checkpoint holds: model (sharded tables + dense) and keyed optimizer state."""
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Reads a :class:`DistCheckpointer` checkpoint into this trainer (collective); returns its trainer state.

        Dense optimizer state is allocated first (``init_state``) so DCP can load into it in place.
        Parameters the optimizer never stepped before the save (no gradient yet, e.g. the S-output
        weights of a pyramid's top layer) have no state in the checkpoint: their state is dropped
        again, exactly as in the uninterrupted run.
        """
        self.dense_opt.init_state()
        self.dense_opt.zero_grad(set_to_none=True)
        sharded = self.sharded_state()
        saved = DistCheckpointer.saved_keys(path)
        never_stepped = [k for k, st in sharded["optim"]["state"].items() if k.startswith("dense.")
                         and any(f"optim.state.{k}.{n}" not in saved for n in st)]
        for k in never_stepped:
            del sharded["optim"]["state"][k]
        state = DistCheckpointer.load(path, sharded)
        self.model.load_state_dict(sharded["model"])
        for k in never_stepped:
            self.dense_opt.state.pop(self.dense_opt.params[k.removeprefix("dense.")], None)
        self.sched.load_state_dict(state["sched"])
        for group, lr in zip(self.dense_opt.param_groups, self.sched.get_last_lr()):
            group["lr"] = lr  # LambdaLR.load_state_dict leaves the optimizer's current lr as it was
        return state

    def step(self, batch: RequestBatch) -> StepResult:
        """Forward/backward on this rank's part of the global batch, then the dense step.

        Every rank must pass a batch with the same number of requests (torchrec's gloo row-wise
        pooled all-to-all needs equal batch sizes); candidate counts may differ.
        """
        batch = batch.to(self.device)
        n_local = torch.tensor([float(batch.num_candidates)], device=self.device)
        n_global = n_local.clone()
        dist.all_reduce(n_global)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(batch)
        loss_mean, per_task = multitask_bce(logits, batch.labels, self.task_weights)
        share = n_local / n_global  # [1]
        loss = loss_mean * share[0]
        self.dense_opt.zero_grad(set_to_none=True)
        loss.backward()  # sparse tables are updated here (fused)
        with torch.no_grad():
            for p in self.dense_params:
                if p.grad is not None:
                    p.grad.mul_(self.world_size)  # DDP averaged; the global loss needs the sum
        if self.oc.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.dense_params, self.oc.clip_grad_norm)
        self.dense_opt.step()
        self.sched.step()
        stats = torch.cat([loss.detach().reshape(1), per_task.detach().float() * share])
        dist.all_reduce(stats)
        if not torch.isfinite(stats).all():
            raise FloatingPointError(f"non-finite global loss {stats.tolist()}")
        return StepResult(float(stats[0]), stats[1:].tolist(), int(n_global.item()))
