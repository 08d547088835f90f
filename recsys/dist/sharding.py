"""Shard the ranker's torchrec tables with ``DistributedModelParallel``; fused sparse optimizer.

Layout: the torchrec modules of ``FeatureEmbeddings`` (sequence ``EmbeddingCollection``, the
semantic-ID ``EmbeddingCollection`` of ``item_embedding.mode=sid|both``, pooled
``EmbeddingBagCollection``) are sharded by torchrec's planner (table-wise, row-wise, ... per ``dist.sharding``); everything else (tokenizer projections, blocks, heads) is replicated
and wrapped in DDP by DMP (gradients averaged). The sparse optimizer runs fused inside the
tables' backward (``apply_optimizer_in_backward`` -> FBGEMM ``EXACT_ROWWISE_ADAGRAD``).

Two ways in, same initial weights (``shard_ranker`` picks by where the tables are):

* tables on ``meta`` (``build_sharded_ranker`` / ``recsys.dist.meta_init.build_meta_model``): DMP
  allocates and initialises only this rank's shards (``shard_meta_model``); per-rank table memory is
  the shard, never the whole table;
* tables on CPU (a full plain model, e.g. one whose weights were changed): ``shard_model`` copies
  its full state into the shards (peak: the whole tables twice plus the shard, on every rank).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.optim import Adagrad, RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from recsys.data.schema import DataSchema
from recsys.dist.config import DistConfig, Sharding, SparseOptimizer
from recsys.dist.meta_init import build_meta_model, meta_tensors
from recsys.embeddings.tables import FeatureEmbeddings
from recsys.model.config import ModelConfig

PLANNER_TYPES = (ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value, ShardingType.COLUMN_WISE.value)


class RowWiseEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """The stock EBC sharder, plus row-wise sharding on CPU.

    torchrec offers row-wise / table-row-wise for EmbeddingBagCollection on CUDA only; the
    CPU kernels (FBGEMM CPU TBE + gloo reduce-scatter) run it correctly, checked against a
    single process by tests/dist/.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        for extra in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
            if extra not in types:
                types.append(extra)
        return types


def sharders() -> list[ModuleSharder[nn.Module]]:
    return [EmbeddingCollectionSharder(), RowWiseEmbeddingBagCollectionSharder()]


def table_names(emb: FeatureEmbeddings) -> list[str]:
    """Every torchrec table of ``emb`` (sequence, semantic-ID, pooled): each one constrained by the plan."""
    return list(table_inits(emb))


def fuse_sparse_optimizer(emb: FeatureEmbeddings, kind: SparseOptimizer, lr: float, eps: float) -> None:
    """Attach the sparse optimizer to every table parameter; DMP turns it into a fused FBGEMM update.

    Same update rule as the single-process ``torchrec.optim.RowWiseAdagrad`` / ``Adagrad`` step
    (state += mean_row(g^2) or g^2; w -= lr * g / (sqrt(state) + eps)), applied during backward.
    """
    cls = RowWiseAdagrad if SparseOptimizer(kind) == SparseOptimizer.rowwise_adagrad else Adagrad
    apply_optimizer_in_backward(cls, list(emb.parameters()), {"lr": lr, "eps": eps})


def plan_sharding(model: nn.Module, emb: FeatureEmbeddings, sharding: Sharding, device: torch.device
                  ) -> ShardingPlan:
    """torchrec planner over ``dist.get_world_size()`` ranks; ``sharding != auto`` constrains every table.

    A collective: every rank must call it (the plan is computed on rank 0 and broadcast).
    """
    sharding = Sharding(sharding)
    # auto: the planner's choice, minus data-parallel (see Sharding: wrong with the fused optimizer)
    types = list(PLANNER_TYPES) if sharding == Sharding.auto else [sharding.value]
    constraints = {t: ParameterConstraints(sharding_types=types) for t in table_names(emb)}
    topology = Topology(world_size=dist.get_world_size(), compute_device=device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    return planner.collective_plan(model, sharders(), dist.GroupMember.WORLD)


def shard_model(model: nn.Module, emb: FeatureEmbeddings, sharding: Sharding, device: torch.device
                ) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Wrap ``model`` (tables on CPU, fused optimizer attached) in DMP; its initial weights are kept.

    Every rank passes the same (same-seed) full model; after sharding, each rank's shards are
    copied from it, so the run starts from exactly the weights a single process would use.
    """
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plan = plan_sharding(model, emb, sharding, device)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders())
    load_full_state(dmp, full)
    return dmp, plan


def shard_meta_model(model: nn.Module, emb: FeatureEmbeddings, sharding: Sharding, device: torch.device
                     ) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Wrap ``model`` (tables on meta, fused optimizer attached) in DMP, materialising only this rank's shards.

    Each sharded module runs its tables' ``init_fn`` (``SeededTableInit``) on its ``ShardedTensor``s:
    every local shard gets the rows/columns the plain model's full table has there. A collective.
    """
    inits = table_inits(emb)
    plan = plan_sharding(model, emb, sharding, device)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders(),
                                   init_data_parallel=True, init_parameters=True)
    left = meta_tensors(dmp)
    if left:
        raise RuntimeError(f"still on meta after sharding (not a sharded table?): {left[:10]}")
    init_local_shards(dmp, inits)
    return dmp, plan


def table_inits(emb: FeatureEmbeddings) -> dict[str, Callable[[torch.Tensor], Any]]:
    """``{table name: init_fn}`` of every torchrec table of ``emb``."""
    configs = list(emb.seq_tables.embedding_configs())
    if emb.sid_tables is not None:
        configs += emb.sid_tables.embedding_configs()
    if emb.sparse_tables is not None:
        configs += emb.sparse_tables.embedding_bag_configs()
    return {c.name: c.init_fn for c in configs}


@torch.no_grad()
def init_local_shards(dmp: DistributedModelParallel, inits: dict[str, Callable[[torch.Tensor], Any]]) -> None:
    """Runs each table's ``init_fn`` on its sharded weight (``...<table>.weight`` of ``dmp.state_dict()``).

    Why not torchrec's own ``reset_parameters``: the sharded modules hand ``init_fn`` the bare local
    shard, without its offsets; the ``ShardedTensor`` of the ``state_dict`` carries them (its local
    shards are views of the FBGEMM weights). Local, no collective.
    """
    for key, value in dmp.state_dict().items():
        parts = key.split(".")
        if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in inits:
            inits[parts[-2]](value)


def shard_ranker(model: nn.Module, dcfg: DistConfig, device: torch.device, sparse: SparseOptimizer,
                 sparse_lr: float) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Fused sparse optimizer (``sparse``, ``sparse_lr``, ``dcfg.fused_eps``) + plan + DMP for the ranker.

    Tables on meta -> :func:`shard_meta_model`; on CPU -> :func:`shard_model` (full weights copied).
    A collective: every rank calls it with the same-seed model.
    """
    emb = model.tokenizer.embeddings
    fuse_sparse_optimizer(emb, sparse, sparse_lr, dcfg.fused_eps)
    if meta_tensors(emb):
        return shard_meta_model(model, emb, dcfg.sharding, device)
    return shard_model(model, emb, dcfg.sharding, device)


def build_sharded_ranker(schema: DataSchema, model_cfg: ModelConfig, max_s_tokens: int, dcfg: DistConfig,
                         device: torch.device, sparse: SparseOptimizer, sparse_lr: float
                         ) -> tuple[DistributedModelParallel, ShardingPlan]:
    """The sharded ranker straight from its config: tables built on meta, only this rank's shards
    allocated. Seed first (``torch.manual_seed``, same on every rank): the initial weights then equal
    those of ``build_model`` under the same seed. A collective."""
    return shard_ranker(build_meta_model(schema, model_cfg, max_s_tokens), dcfg, device, sparse, sparse_lr)


def _copy_into(dst: Any, src: torch.Tensor, key: str) -> None:
    if isinstance(dst, ShardedTensor):
        if tuple(dst.size()) != tuple(src.shape):
            raise ValueError(f"{key}: full tensor {tuple(src.shape)} vs sharded {tuple(dst.size())}")
        for shard in dst.local_shards():
            idx = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
            shard.tensor.detach().copy_(src[idx])
    else:
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"{key}: full tensor {tuple(src.shape)} vs local {tuple(dst.shape)}")
        dst.detach().copy_(src)


@torch.no_grad()
def load_full_state(dmp: DistributedModelParallel, full: dict[str, torch.Tensor]) -> None:
    """Copy an unsharded ``state_dict`` (keys of the plain model) into the sharded model, in place.

    Local only (no collective): each rank writes the rows/columns of the shards it owns.
    """
    own = dmp.state_dict()
    missing = sorted(set(own) - set(full))
    unexpected = sorted(set(full) - set(own))
    if missing or unexpected:
        raise ValueError(f"state does not match the sharded model: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    for key, dst in own.items():
        _copy_into(dst, full[key].to(dst.device if not isinstance(dst, ShardedTensor) else "cpu"), key)


@torch.no_grad()
def gather_full_state(dmp: DistributedModelParallel, device: torch.device | None = None
                      ) -> dict[str, torch.Tensor] | None:
    """The unsharded ``state_dict`` (plain-model keys, CPU) on rank 0, ``None`` elsewhere. A collective.

    ``device``: where the shards live (the gather buffer must be there too: ``cuda:<local rank>`` on nccl).
    """
    rank = dist.get_rank()
    device = device or torch.device("cpu")
    out: dict[str, torch.Tensor] = {}
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(tuple(value.size()), dtype=value.dtype, device=device) if rank == 0 else None
            value.gather(dst=0, out=full)
            if rank == 0:
                out[key] = full.cpu()
        elif rank == 0:
            out[key] = value.detach().cpu().clone()
    return out if rank == 0 else None


def describe_plan(plan: ShardingPlan) -> dict[str, dict[str, Any]]:
    """``{table: {"sharding": type, "ranks": [...]}}`` for logs and the report."""
    out: dict[str, dict[str, Any]] = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            ranks = sorted({r for s in (ps.sharding_spec.shards if ps.sharding_spec else [])
                            for r in [s.placement.rank()]}) if ps.sharding_spec else (ps.ranks or [])
            out[table] = {"sharding": ps.sharding_type, "ranks": ranks}
    return out
