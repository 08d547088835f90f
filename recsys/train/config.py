"""Structured configs of `python -m recsys.train` (registered in Hydra's ConfigStore).

Unknown keys fail at start-up: every group YAML is merged into these typed nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from hydra.core.config_store import ConfigStore

from recsys.data.config import DataConfig
from recsys.dist.config import DistConfig
from recsys.model.config import ModelConfig


class DenseOptimizer(str, Enum):
    adamw = "adamw"
    rmsprop = "rmsprop"


class SparseOptimizer(str, Enum):
    adagrad = "adagrad"
    rowwise_adagrad = "rowwise_adagrad"


class LrDecay(str, Enum):
    constant = "constant"
    cosine = "cosine"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


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
            raise ValueError(f"train.optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.dense_lr <= 0 or self.sparse_lr <= 0:
            raise ValueError("learning rates must be > 0")


@dataclass
class TrainConfig:
    seed: int = 0
    """Seeds torch and Python RNGs (data order is seeded by data.loader.seed)."""
    epochs: int = 1
    """Passes over the train split."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    eval_every: int = 0
    """Validate every N steps (0 = only after training)."""
    eval_max_batches: int = 0
    """Cap on validation batches per evaluation (0 = whole split)."""
    log_every: int = 20
    """Steps between metric lines in train_log.jsonl."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    resume: bool = True
    """Continue from the newest valid checkpoint in the output dir, if any."""
    bf16: bool = False
    """bf16 autocast for forward/backward (parameters and optimizer stay fp32)."""
    device: Device = Device.auto
    """auto = cuda when available."""
    task_weights: list[float] = field(default_factory=list)
    """Loss weight per task (empty = all 1)."""
    progress: bool = True
    """tqdm progress bar."""
    max_consecutive_nonfinite: int = 10
    """Steps with a NaN/Inf loss or gradient are skipped (no update) and counted; one more than this
    many in a row stops training with FloatingPointError (0 = stop at the first)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizers."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError("train.epochs must be >= 1")
        for n in ("max_steps", "eval_every", "eval_max_batches", "checkpoint_every", "max_consecutive_nonfinite"):
            if getattr(self, n) < 0:
                raise ValueError(f"train.{n} must be >= 0")
        self.device = Device(self.device)
        if self.keep_checkpoints < 1:
            raise ValueError("train.keep_checkpoints must be >= 1")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    """Distributed training (``dist=gloo|nccl`` under torchrun; recsys/dist/, docs/distributed.md)."""
    output_dir: str = "runs/train/latest"
    """Where checkpoints, train_log.jsonl and report.json go."""


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=RunConfig)
