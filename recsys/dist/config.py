"""The ``dist`` config group (``configs/dist/{none,gloo,nccl}.yaml``): how a run is distributed.

Kept free of torch imports: ``recsys.train.config`` embeds it in ``RunConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Backend(str, Enum):
    none = "none"
    """Single process (the plain ``recsys.train`` loop)."""
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

    def __post_init__(self) -> None:
        self.backend = Backend(self.backend)
        self.sharding = Sharding(self.sharding)
        if self.fused_eps <= 0:
            raise ValueError(f"dist.fused_eps must be > 0, got {self.fused_eps}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"dist.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
