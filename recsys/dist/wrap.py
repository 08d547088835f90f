"""The ranker under N ranks: tables sharded by DMP with the sparse optimizer fused into their backward,
a keyed dense optimizer, and their DCP state (what ``recsys.dist.strategy.Distributed`` composes).

Gradient bookkeeping (what makes N ranks equal one process on the same global batch):

* the loss a process would minimise on the global batch is the mean over its ``N`` candidates,
  ``L = (1/N) sum_i l_i``. Rank ``r`` backpropagates its share ``L_r = (1/N) sum_{i in r} l_i``
  (``N`` from an all-reduce of the candidate counts, ``recsys.train.step``), and ``sum_r L_r = L``;
* sharded tables: torchrec's all-to-all backward *sums* every rank's row gradients into the
  owning shard, so the fused update sees ``dL/dE`` exactly;
* dense parameters: DDP *averages* over ranks, giving ``dL/dtheta / W``; the step multiplies
  the dense gradients by ``W`` before clipping (``Distributed.after_backward``), so clipping and
  AdamW see ``dL/dtheta``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys.dist.checkpoint import DistCheckpointer
from recsys.dist.config import DistConfig, OptimConfig
from recsys.dist.optim import dense_optimizer
from recsys.dist.sharding import describe_plan, shard_ranker


def wrap_sharded(model: nn.Module, oc: OptimConfig, dcfg: DistConfig, device: torch.device
                 ) -> tuple[DistributedModelParallel, KeyedOptimizerWrapper, list[nn.Parameter], dict[str, Any]]:
    """(DMP module, dense optimizer, dense parameters, described plan) of the ranker ``model``, built with the
    same seed on every rank: tables on meta (``recsys.dist.meta_init``: only this rank's shards are ever
    allocated, each initialised as the plain model's table there) or a full plain model (its weights are
    copied into the shards); see ``recsys.dist.sharding.shard_ranker``. A collective."""
    dmp, plan = shard_ranker(model, dcfg, device, oc.sparse, oc.sparse_lr)
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters(), include=False))
    dense_opt = KeyedOptimizerWrapper(dense, lambda params: dense_optimizer(params, oc))
    return dmp, dense_opt, list(dense.values()), describe_plan(plan)


def sharded_state(dmp: DistributedModelParallel, dense_opt: KeyedOptimizerWrapper) -> dict[str, Any]:
    """What a DCP checkpoint holds: model (sharded tables + dense) and the keyed optimizer state
    (fused table accumulators + dense)."""
    optimizer = CombinedOptimizer([("sparse", dmp.fused_optimizer), ("dense", dense_opt)])
    return {"model": dmp.state_dict(), "optim": optimizer.state_dict()}


def load_sharded(dmp: DistributedModelParallel, dense_opt: KeyedOptimizerWrapper, path: Path) -> None:
    """Collective: read the DCP checkpoint at ``path`` into the model and optimizers (resharded to this plan).

    Dense optimizer state is allocated first (``init_state``) so DCP can load into it in place.
    Parameters the optimizer never stepped before the save (no gradient yet, e.g. the S-output
    weights of a pyramid's top layer) have no state in the checkpoint: their state is dropped
    again, exactly as in the uninterrupted run.
    """
    dense_opt.init_state()
    dense_opt.zero_grad(set_to_none=True)
    sharded = sharded_state(dmp, dense_opt)
    saved = DistCheckpointer.saved_keys(path)
    never_stepped = [k for k, st in sharded["optim"]["state"].items() if k.startswith("dense.")
                     and any(f"optim.state.{k}.{n}" not in saved for n in st)]
    for k in never_stepped:
        del sharded["optim"]["state"][k]
    DistCheckpointer.load(path, sharded)
    dmp.load_state_dict(sharded["model"])
    for k in never_stepped:
        dense_opt.state.pop(dense_opt.params[k.removeprefix("dense.")], None)
