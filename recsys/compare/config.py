"""Structured config of ``python -m recsys.compare`` (ConfigStore name ``compare_schema``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from recsys.data.config import DataConfig
from recsys.evaluate.config import CatalogEvalConfig
from recsys.train.config import TrainConfig


@dataclass
class CompareConfig:
    """Train every listed model on one dataset with one training config, evaluate each the same way."""

    data: DataConfig = field(default_factory=DataConfig)
    """The dataset (config group ``data``), shared by every model."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training schedule shared by every model (its ``seed`` is replaced by each entry of ``seeds``)."""
    models: list[str] = field(default_factory=lambda: ["small", "popularity", "dlrm", "din", "sasrec"])
    """Model presets: file names under configs/model/ (without .yaml)."""
    model_overrides: dict[str, list[str]] = field(default_factory=dict)
    """Per preset, dotted ``key=value`` overrides of its model config (e.g. ``small: [n_layers=2]``)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Training seeds; the table shows mean and std over them."""
    catalog: CatalogEvalConfig = field(default_factory=CatalogEvalConfig)
    """Full-catalog ranking settings of every model's evaluation."""
    batch_size: int = 256
    """Requests per scoring batch (throughput measurement)."""
    num_threads: int = 0
    """torch intra-op CPU threads (0 = torch's default). On a busy shared CPU, 1 avoids thread oversubscription
    (measured here: small-batch forwards 10-300x faster at load average 8 on 2 cores)."""
    output_dir: str = "runs/compare/latest"
    """One sub-folder per (model, seed) with the training run and its eval/ report; table.md/json, bars.png."""

    def __post_init__(self) -> None:
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")
        if not self.models:
            raise ValueError("compare.models is empty")
        if not self.seeds:
            raise ValueError("compare.seeds is empty")
        unknown = set(self.model_overrides) - set(self.models)
        if unknown:
            raise ValueError(f"model_overrides for presets not in models: {sorted(unknown)}")


def register_configs() -> None:
    ConfigStore.instance().store(name="compare_schema", node=CompareConfig)
