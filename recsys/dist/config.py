"""The ``dist`` config group (``configs/dist/{none,gloo,nccl}.yaml``): how a run is distributed, and the
optimizer settings (``train.optim``) that one process and N ranks both apply.

Kept free of torch imports: ``recsys.train.config`` embeds both in ``RunConfig`` (validated before the
heavy imports).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from recsys.errors import InputError


class Backend(str, Enum):
    """torch.distributed process-group backend of a run (``dist.backend``). Not the same thing as
    ``recsys.model.config.Backend``, which names an attention kernel (``model.attention_backend``)."""

    none = "none"
    """Single process (``python -m recsys.train``)."""
    gloo = "gloo"
    """CPU processes (torchrun); tables sharded by torchrec, dense parts data-parallel."""
    nccl = "nccl"
    """One GPU per process (torchrun); same layout as gloo."""


class Sharding(str, Enum):
    auto = "auto"
    """The torchrec planner picks each table's sharding among table-wise, row-wise and column-wise."""
    table_wise = "table_wise"
    """Every table whole on one rank (the planner balances tables over ranks)."""
    row_wise = "row_wise"
    """Every table split by rows over all ranks."""
    column_wise = "column_wise"
    """Every table split by embedding columns."""
    # No data_parallel: with the fused in-backward optimizer, torchrec 1.8's replicated tables do not
    # match a single process (tests/dist), and an EmbeddingCollection fails outright on CPU.


class Pipeline(str, Enum):
    """How the trainer drives its steps under N ranks (``dist.pipeline``; ``recsys.dist.pipeline``)."""

    auto = "auto"
    """``sparse_dist`` when world_size > 1 and the model pipelines (``model.item_embedding.hash_buckets=0``),
    else ``none``."""
    sparse_dist = "sparse_dist"
    """torchrec's ``TrainPipelineSparseDist``: batch i+1's copy and input all-to-all start during step i."""
    none = "none"
    """Each batch copied, distributed and trained in turn (always so in one process)."""


@dataclass
class DistConfig:
    backend: Backend = Backend.none
    """none = single process; gloo (CPU) / nccl (GPU) = one process per rank, launched by torchrun."""
    sharding: Sharding = Sharding.auto
    """Sharding type forced on every embedding table (auto = planner's choice)."""
    fused_eps: float = 1e-10
    """eps of the fused (in-backward) sparse Adagrad; 1e-10 = torchrec's RowWiseAdagrad default, as in
    single-process training."""
    keep_checkpoints: int = 2
    """Distributed (DCP) checkpoints kept under ``<output_dir>/dist_checkpoints``."""
    pipeline: Pipeline = Pipeline.auto
    """auto | sparse_dist | none (:class:`Pipeline`); only ``none`` without torchrun (``backend=none``).
    Results are the same either way (tests/dist/test_pipeline.py): it only reorders the input work."""

    def __post_init__(self) -> None:
        self.backend = Backend(self.backend)
        self.sharding = Sharding(self.sharding)
        self.pipeline = Pipeline(self.pipeline)
        if self.backend == Backend.none and self.pipeline == Pipeline.sparse_dist:
            raise InputError("dist.pipeline=sparse_dist needs torchrun ranks (dist=gloo|nccl): one process "
                             "(dist=none) trains each batch in turn; drop dist.pipeline or use dist=gloo")
        if self.fused_eps <= 0:
            raise InputError(f"dist.fused_eps must be > 0, got {self.fused_eps}")
        if self.keep_checkpoints < 1:
            raise InputError(f"dist.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")


class DenseOptimizer(str, Enum):
    adamw = "adamw"
    rmsprop = "rmsprop"


class SparseOptimizer(str, Enum):
    adagrad = "adagrad"
    rowwise_adagrad = "rowwise_adagrad"


class LrDecay(str, Enum):
    constant = "constant"
    cosine = "cosine"


@dataclass
class OptimConfig:
    dense: DenseOptimizer = DenseOptimizer.adamw
    """Optimizer of every non-embedding parameter."""
    dense_lr: float = 1e-3
    """Learning rate of the dense optimizer."""
    weight_decay: float = 0.0
    """AdamW / RMSProp weight decay (dense only)."""
    sparse: SparseOptimizer = SparseOptimizer.rowwise_adagrad
    """Optimizer of the embedding tables (torchrec's row-wise Adagrad keeps one accumulator per row)."""
    sparse_lr: float = 0.05
    """Learning rate of the sparse optimizer."""
    clip_grad_norm: float = 1.0
    """Max global grad norm of the dense parameters (0 disables clipping)."""
    warmup_steps: int = 50
    """Linear warm-up of the dense learning rate."""
    lr_decay: LrDecay = LrDecay.constant
    """After warm-up: constant, or cosine decay to ``min_lr_ratio`` x dense_lr at the last step."""
    min_lr_ratio: float = 0.1
    """Final dense learning rate / dense_lr for cosine decay."""

    def __post_init__(self) -> None:
        self.dense = DenseOptimizer(self.dense)
        self.sparse = SparseOptimizer(self.sparse)
        self.lr_decay = LrDecay(self.lr_decay)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise InputError(f"train.optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.dense_lr <= 0 or self.sparse_lr <= 0:
            raise InputError(f"train.optim.dense_lr and sparse_lr must be > 0, got {self.dense_lr}, {self.sparse_lr}")
