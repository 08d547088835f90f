"""Structured config of ``python -m recsys.quant`` (registered in Hydra's ConfigStore as ``quant_schema``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from hydra.core.config_store import ConfigStore

from recsys.data.config import DataConfig
from recsys.errors import InputError


class ContentSource(str, Enum):
    parquet = "parquet"
    checkpoint = "checkpoint"
    side_features = "side_features"
    synthetic = "synthetic"


class QuantMethod(str, Enum):
    rq_kmeans = "rq_kmeans"
    rq_vae = "rq_vae"
    multi_expert = "multi_expert"


class CollisionFix(str, Enum):
    extra_level = "extra_level"
    rebalance_last = "rebalance_last"


@dataclass
class ContentConfig:
    """Where the item content vectors come from (``recsys/quant/content.py``)."""

    source: ContentSource = ContentSource.synthetic
    """parquet (item_id + vector), checkpoint (its item table), side_features (category / genres), synthetic."""
    path: str | None = None
    """The Parquet file (source=parquet) or checkpoint file (source=checkpoint)."""
    dim: int = 16
    """synthetic: content vector width."""
    noise: float = 0.5
    """synthetic: per-dimension Gaussian noise around the category centroid."""
    w_popularity: float = 1.0
    """synthetic: weight of the item's standardised log popularity along a fixed direction."""
    w_quality: float = 1.0
    """synthetic: weight of the item's hidden quality along another fixed direction."""

    def __post_init__(self) -> None:
        self.source = ContentSource(self.source)
        reads_path = self.source in (ContentSource.parquet, ContentSource.checkpoint)
        if reads_path and not self.path:
            raise InputError(f"content.source={self.source.value} needs content.path")
        if self.path and not reads_path:  # silently ignored otherwise
            raise InputError(f"content.path={self.path} is set, but content.source={self.source.value} does not "
                             "read it (only content.source=parquet | checkpoint do): drop content.path")
        if reads_path and not Path(self.path).is_file():
            raise InputError(f"content.path={self.path} is not a file (content.source={self.source.value})")
        if self.dim < 1 or self.noise < 0:
            raise InputError("quant.content.dim must be >= 1 and content.noise >= 0")


@dataclass
class RqVaeConfig:
    hidden: int = 128
    """Encoder / decoder MLP hidden width."""
    code_dim: int = 32
    """Latent (code vector) width."""
    epochs: int = 50
    """Passes over the catalog."""
    batch_size: int = 256
    """Items per step (the first batch also seeds the codebooks by k-means)."""
    lr: float = 1e-3
    """Adam learning rate."""
    beta: float = 0.25
    """Commitment loss weight."""


@dataclass
class ExpertConfig:
    experts: int = 4
    """Parallel experts E (codes per item)."""
    proj_dim: int = 0
    """Projection width p per expert (0 = content dim // E, so the stacked V can be orthonormal)."""
    orth_weight: float = 1.0
    """Weight of ||V V^T - I||_F^2."""
    epochs: int = 50
    """Passes over the catalog."""
    batch_size: int = 256
    """Items per step."""
    lr: float = 1e-2
    """Adam learning rate."""
    beta: float = 0.25
    """Commitment loss weight."""


@dataclass
class QuantConfig:
    """Item content -> semantic IDs: ``sids.pt``, ``report.json``, ``report.png`` under ``output_dir``."""

    content: ContentConfig = field(default_factory=ContentConfig)
    """Input vectors."""
    method: QuantMethod = QuantMethod.rq_kmeans
    """rq_kmeans | rq_vae (residual levels) | multi_expert (parallel codes)."""
    levels: int = 3
    """Residual levels (rq_kmeans / rq_vae)."""
    codebook_size: int = 0
    """Codes per level / expert; 0 = auto: min(256, 2 * next power of 2 >= N^(1/levels)) for N items."""
    balanced: bool = False
    """rq_kmeans: capacity-constrained assignment (each code at most ceil(N/K) items per level)."""
    kmeans_iters: int = 25
    """Lloyd iterations per level (rq_kmeans)."""
    rq_vae: RqVaeConfig = field(default_factory=RqVaeConfig)
    """RQ-VAE settings."""
    multi_expert: ExpertConfig = field(default_factory=ExpertConfig)
    """Multi-expert settings."""
    collision_fix: CollisionFix = CollisionFix.extra_level
    """extra_level: items sharing a tuple get a disambiguation code in an extra (not embedded) column;
    rebalance_last: first re-assign last-level codes inside colliding prefixes so tuples differ in the
    embedded columns, the extra column only for prefixes with more than K items."""
    seed: int = 0
    """Same seed + same content -> same codes."""
    progress: bool = True
    """tqdm bars."""
    output_dir: str = "runs/quant"
    """Where sids.pt, report.json and report.png are written."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset (content.source = side_features / synthetic read it; its item table sizes the SID table)."""

    def __post_init__(self) -> None:
        self.method = QuantMethod(self.method)
        self.collision_fix = CollisionFix(self.collision_fix)
        if self.levels < 1 or self.codebook_size < 0 or self.kmeans_iters < 1:
            raise InputError("quant.levels >= 1, quant.codebook_size >= 0 (0 = auto), quant.kmeans_iters >= 1")
        if self.rq_vae.beta < 0 or self.multi_expert.orth_weight < 0:
            raise InputError("quant.rq_vae.beta and quant.multi_expert.orth_weight must be >= 0")


def register_configs() -> None:
    ConfigStore.instance().store(name="quant_schema", node=QuantConfig)
