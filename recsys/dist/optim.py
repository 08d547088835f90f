"""Optimizer settings (``train.optim``) and the optimizers they make, for one process and for N ranks.

Sparse = the torchrec embedding tables (``recsys.baselines.factory.sparse_parameters``), dense = every
other parameter. One process steps torchrec's ``RowWiseAdagrad`` / ``Adagrad`` after backward
(:func:`make_optimizers`); N ranks fuse the same rule into the sharded tables' backward
(``recsys.dist.sharding.fuse_sparse_optimizer``). The dense optimizer is :func:`dense_optimizer` in both.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.optim import RowWiseAdagrad

from recsys.baselines.factory import sparse_parameters
from recsys.dist.config import DenseOptimizer, OptimConfig, SparseOptimizer


def dense_optimizer(params: list[nn.Parameter], oc: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or RMSprop over ``params`` (weight decay on the dense parameters only)."""
    if DenseOptimizer(oc.dense) == DenseOptimizer.adamw:
        return torch.optim.AdamW(params, lr=oc.dense_lr, weight_decay=oc.weight_decay)
    return torch.optim.RMSprop(params, lr=oc.dense_lr, weight_decay=oc.weight_decay)


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(table weights, every other parameter) of a plain model, in ``model.parameters()`` order."""
    sparse_ids = {id(p) for p in sparse_parameters(model)}
    params = list(model.parameters())
    return [p for p in params if id(p) in sparse_ids], [p for p in params if id(p) not in sparse_ids]


def make_optimizers(model: nn.Module, cfg: OptimConfig) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """One process: (sparse optimizer over the torchrec tables, dense optimizer over everything else)."""
    sparse, dense = split_parameters(model)
    if cfg.sparse == SparseOptimizer.rowwise_adagrad:
        opt_sparse: torch.optim.Optimizer = RowWiseAdagrad(sparse, lr=cfg.sparse_lr)
    else:
        opt_sparse = torch.optim.Adagrad(sparse, lr=cfg.sparse_lr)
    return opt_sparse, dense_optimizer(dense, cfg)
