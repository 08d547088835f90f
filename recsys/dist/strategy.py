"""How a run is spread over processes: the pieces ``recsys.train``'s one loop composes.

:class:`SingleProcess` (``dist=none``) and :class:`Distributed` (``dist=gloo|nccl`` under torchrun) offer
the same methods, so the trainer (``recsys.train.loop`` / ``recsys.train.step``) has one code path:

* ``decide(fn)``: a decision one process takes for all (lock, resume choice), refusals included;
* ``instantiate(build)``: the model to wrap (N ranks: its tables on meta, no whole table on any rank);
* ``wrap(model, oc, lr_lambda)``: the module to train and its :class:`Optimizers`. One process: the
  model as is, torchrec ``RowWiseAdagrad`` / ``Adagrad`` stepped after backward. N ranks: the tables
  sharded by ``DistributedModelParallel`` with the sparse optimizer fused into their backward,
  the dense parts data-parallel (DDP);
* ``sum_`` / ``max_`` / ``all_finite`` / ``gather_objects``: collectives (identities for one process);
* ``after_backward``: N ranks: DDP averaged the dense gradients, the global loss needs their sum;
* ``save`` / ``load``: ``checkpoints/step_<N>.pt`` (one file, ``recsys.reliability.checkpoint``) or
  DCP ``dist_checkpoints/step_<N>/`` (``recsys.dist.checkpoint``), with the trainer's own state beside;
* ``plain_model``: the trained model unsharded, for evaluation (rank 0 only under N ranks).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from recsys.dist.checkpoint import DistCheckpointer
from recsys.dist.config import Backend, DistConfig, OptimConfig
from recsys.dist.coordination import on_rank0
from recsys.dist.optim import make_optimizers
from recsys.errors import InputError
from recsys.reliability.checkpoint import CheckpointManager, load_model_state
from recsys.reliability.device import resolve_device

T = TypeVar("T")
DIST_CHECKPOINT_DIR = "dist_checkpoints"  # the distributed (DCP) checkpoints under output_dir
# What every resume reads from the trainer's state (beside the model / optimizer state of the strategy).
TRAINER_KEYS = ("sched", "popularity", "step", "epoch", "batch_in_epoch", "train_time", "samples", "requests")
RESUME_KEYS = ("model", "opt_sparse", "opt_dense", *TRAINER_KEYS)  # one process: everything in step_<N>.pt
DIST_RESUME_KEYS = (*TRAINER_KEYS, "world_size")  # N ranks: trainer.pt (model and optimizers in the DCP files)


@dataclass
class Optimizers:
    """What one training step updates."""

    dense: torch.optim.Optimizer
    """Over every non-table parameter (a torchrec ``KeyedOptimizerWrapper`` under N ranks)."""
    sparse: torch.optim.Optimizer | None
    """Over the tables, stepped after backward; None when fused into the tables' backward (N ranks)."""
    sched: torch.optim.lr_scheduler.LambdaLR
    """Dense learning-rate schedule."""
    dense_params: list[nn.Parameter]
    """Clipped by ``train.optim.clip_grad_norm``; counted as ``params_dense``."""
    checked: list[nn.Parameter]
    """Parameters whose gradients the non-finite guard checks before any update is applied."""

    def zero_grad(self) -> None:
        for opt in (self.sparse, self.dense):
            if opt is not None:
                opt.zero_grad(set_to_none=True)


class SingleProcess:
    """One process (``dist=none``)."""

    rank, world, main, fused_tables = 0, 1, True, False
    checkpoint_dir, resume_keys = "checkpoints", RESUME_KEYS

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def decide(self, fn: Callable[[], T]) -> T:
        return fn()

    def barrier(self) -> None:
        pass

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_finite(self, ok: bool) -> bool:
        return ok

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj]

    def instantiate(self, build: Callable[[], nn.Module]) -> nn.Module:
        """The model :meth:`wrap` takes: ``build()`` (call it seeded: same seed on every rank)."""
        return build()

    def wrap(self, model: nn.Module, oc: OptimConfig, lr_lambda: Callable[[int], float]
             ) -> tuple[nn.Module, Optimizers]:
        model = model.to(self.device)
        opt_sparse, opt_dense = make_optimizers(model, oc)
        dense = [p for g in opt_dense.param_groups for p in g["params"]]
        sparse = [p for g in opt_sparse.param_groups for p in g["params"]]
        return model, Optimizers(opt_dense, opt_sparse, torch.optim.lr_scheduler.LambdaLR(opt_dense, lr_lambda),
                                 dense, sparse + dense)

    def after_backward(self, opt: Optimizers) -> None:
        pass

    def store(self, out_dir: Path, keep: int) -> CheckpointManager:
        return CheckpointManager(out_dir / self.checkpoint_dir, keep=keep)

    def other_stores(self, out_dir: Path) -> list[CheckpointManager]:
        return []

    def save(self, store: CheckpointManager, step: int, model: nn.Module, opt: Optimizers,
             state: dict[str, Any]) -> None:
        assert opt.sparse is not None
        store.save(step, {"model": model.state_dict(), "opt_sparse": opt.sparse.state_dict(),
                          "opt_dense": opt.dense.state_dict(), "sched": opt.sched.state_dict(), **state})

    def load(self, path: Path, state: dict[str, Any], model: nn.Module, opt: Optimizers) -> None:
        assert opt.sparse is not None
        load_model_state(model, state["model"], str(path))
        opt.sparse.load_state_dict(state["opt_sparse"])
        opt.dense.load_state_dict(state["opt_dense"])
        opt.sched.load_state_dict(state["sched"])

    def plain_model(self, model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
        return model

    def export(self, out_dir: Path, keep: int, step: int, model: nn.Module | None, record: dict[str, Any]) -> None:
        """N ranks write a model-only ``checkpoints/step_<N>.pt`` for scoring; one process already has it."""

    def describe(self) -> dict[str, Any]:
        return {"world_size": 1, "backend": Backend.none.value, "sharding": None}

    def close(self) -> None:
        pass


class Distributed(SingleProcess):
    """One of N torchrun processes (``dist=gloo|nccl``); see the module docstring."""

    fused_tables = True
    checkpoint_dir, resume_keys = DIST_CHECKPOINT_DIR, DIST_RESUME_KEYS

    def __init__(self, dcfg: DistConfig) -> None:
        device, self._created = init_process_group(dcfg)
        super().__init__(device)
        self.dcfg = dcfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.main = self.rank == 0
        self.plan: dict[str, Any] = {}

    def decide(self, fn: Callable[[], T]) -> T:
        return on_rank0(fn)

    def barrier(self) -> None:
        dist.barrier()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def all_finite(self, ok: bool) -> bool:
        bad = torch.tensor([0.0 if ok else 1.0], device=self.device)
        return float(self.sum_(bad)) == 0.0

    def gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def instantiate(self, build: Callable[[], nn.Module]) -> nn.Module:
        """``build()`` with its torchrec tables on meta: :meth:`wrap` then allocates and initialises only this
        rank's shards (``recsys.dist.meta_init``); dense weights and table values as in the plain model."""
        from recsys.dist.meta_init import on_meta

        return on_meta(build)

    def wrap(self, model: nn.Module, oc: OptimConfig, lr_lambda: Callable[[int], float]
             ) -> tuple[nn.Module, Optimizers]:
        from recsys.dist.wrap import wrap_sharded  # torchrec's distributed modules: only when sharding

        dmp, dense_opt, dense, self.plan = wrap_sharded(model, oc, self.dcfg, self.device)
        self._dmp, self._dense_opt = dmp, dense_opt
        return dmp, Optimizers(dense_opt, None, torch.optim.lr_scheduler.LambdaLR(dense_opt, lr_lambda),
                               dense, dense)

    def after_backward(self, opt: Optimizers) -> None:
        with torch.no_grad():
            for p in opt.dense_params:
                if p.grad is not None:
                    p.grad.mul_(self.world)  # DDP averaged; the global loss needs the sum

    def store(self, out_dir: Path, keep: int) -> DistCheckpointer:  # type: ignore[override]
        return DistCheckpointer(out_dir / DIST_CHECKPOINT_DIR, keep=self.dcfg.keep_checkpoints)

    def other_stores(self, out_dir: Path) -> list[CheckpointManager]:
        return [CheckpointManager(out_dir / "checkpoints")]  # the model-only files count as this run's

    def save(self, store: DistCheckpointer, step: int, model: nn.Module, opt: Optimizers,  # type: ignore[override]
             state: dict[str, Any]) -> None:
        from recsys.dist.wrap import sharded_state

        store.save(step, sharded_state(self._dmp, opt.dense),
                   {"sched": opt.sched.state_dict(), "world_size": self.world, **state})

    def load(self, path: Path, state: dict[str, Any], model: nn.Module, opt: Optimizers) -> None:
        from recsys.dist.wrap import load_sharded

        load_sharded(self._dmp, self._dense_opt, path)
        opt.sched.load_state_dict(state["sched"])
        for group, lr in zip(opt.dense.param_groups, opt.sched.get_last_lr()):
            group["lr"] = lr  # LambdaLR.load_state_dict leaves the optimizer's current lr as it was

    def plain_model(self, model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
        """Collective: the tables gathered to rank 0 into a freshly built plain model there; None elsewhere."""
        from recsys.dist.sharding import gather_full_state

        full = gather_full_state(self._dmp, self.device)
        if full is None:
            return None
        plain = build()
        plain.load_state_dict(full)
        return plain.to(self.device)

    def export(self, out_dir: Path, keep: int, step: int, model: nn.Module | None, record: dict[str, Any]) -> None:
        if model is not None:
            CheckpointManager(out_dir / "checkpoints", keep=keep).save(step, {
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "step": step,
                "model_only": True, **record})

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world, "backend": Backend(self.dcfg.backend).value, "sharding": self.plan}

    def close(self) -> None:
        if self._created:
            dist.destroy_process_group()


def init_process_group(dcfg: DistConfig) -> tuple[torch.device, bool]:
    """Joins (or reuses) the torchrun process group; returns (this rank's device, whether we created it)."""
    backend = Backend(dcfg.backend)
    if backend == Backend.nccl and not torch.cuda.is_available():
        raise InputError("dist=nccl needs CUDA devices; use dist=gloo on CPU")
    created = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise InputError(f"dist.backend={backend.value} but RANK/WORLD_SIZE are not set: launch with "
                             "`torchrun --nproc_per_node N -m recsys.train dist=gloo ...`, or use dist=none")
        dist.init_process_group(backend.value)
        created = True
    if backend == Backend.nccl:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return device, created


def check_model_supported(model_cfg: Any, backend: Backend) -> None:
    """Refuse, before any work, a model N ranks cannot shard: the baselines keep their own torchrec tables.
    (Semantic-ID models are sharded: their ``sid_table`` is constrained by the plan like every other table.)"""
    if Backend(backend) == Backend.none:
        return
    where = f"dist={Backend(backend).value}"
    arch = str(getattr(model_cfg.arch, "value", model_cfg.arch))
    if arch != "onetrans":
        raise InputError(f"model.arch={arch} with {where}: distributed training shards the OneTrans ranker's "
                         "tables only; train the baselines in one process (python -m recsys.train model=... "
                         "dist=none)")


def make_strategy(dcfg: DistConfig, model_cfg: Any, device_choice: Any) -> SingleProcess:
    """:class:`SingleProcess` for ``dist=none`` (``train.device`` resolved), else :class:`Distributed`
    (a model it cannot shard is refused first: :func:`check_model_supported`)."""
    check_model_supported(model_cfg, dcfg.backend)
    if Backend(dcfg.backend) == Backend.none:
        return SingleProcess(resolve_device(device_choice, "train.device"))
    return Distributed(dcfg)
