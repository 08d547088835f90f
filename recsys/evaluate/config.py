"""Structured config of ``python -m recsys.evaluate`` (ConfigStore name ``evaluate_schema``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from recsys.reliability.device import Device


class RelevantItems(str, Enum):
    """Which listed candidates of a request are its relevant items in the catalog ranking."""

    auto = "auto"
    """candidates when every request lists exactly one candidate (leave-one-out next-item data such as
    ml-100k), else positives."""
    candidates = "candidates"
    """Every listed candidate, whatever its label (ml-100k: the next item, regardless of rating)."""
    positives = "positives"
    """Candidates labelled 1 on the first task (synthetic impressions: the clicked ones)."""


@dataclass
class CatalogEvalConfig:
    """Full-catalog ranking (HR@K / NDCG@K): every item 1..num_items-1 scored for each request (item 0 is the
    padding id, never ranked); the protocol is ``recsys.serving.ranking``'s."""

    enabled: bool = True
    """Rank the catalog (costs requests x items model scores)."""
    max_requests: int = 0
    """Rank for the first N requests of the split only (0 = all)."""
    k: int = 10
    """Cut-off of HR@K / NDCG@K."""
    target: RelevantItems = RelevantItems.auto
    """Relevant items of a request (see ``RelevantItems``)."""
    rank_task: str | None = None
    """Task whose logit ranks the catalog and whose labels are ``positives`` (None: the first task), as
    ``recsys.score``'s ``catalog.rank_task``; SASRec ranks by its next-item score whatever the task."""
    exclude_history: bool = False
    """Drop the request's (truncated) history items from its ranking; False = EVALUATION.md default."""
    batch_size: int = 16
    """Requests per catalog-scoring batch (B x items scores are held)."""
    candidate_chunk: int = 4096
    """Catalog items per model call (bounds transient memory)."""

    def __post_init__(self) -> None:
        self.target = RelevantItems(self.target)
        for name in ("k", "batch_size", "candidate_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"catalog.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_requests < 0:
            raise ValueError(f"catalog.max_requests must be >= 0, got {self.max_requests}")


@dataclass
class EvaluateConfig:
    """Top-level config of the evaluation report (configs/evaluate.yaml)."""

    checkpoint: str = MISSING
    """A ``step_<N>.pt`` file or a training output dir (newest checkpoint; its train_log.jsonl is plotted)."""
    output_dir: str = MISSING
    """Where metrics.json and the PNGs go."""
    split: str = "test"
    """Split of the checkpoint's dataset to evaluate."""
    batch_size: int = 256
    """Requests per scoring batch."""
    n_buckets: int = 5
    """Quantile buckets of history length and of item popularity."""
    cold_max_count: int = 5
    """An item is *cold* when it was a candidate in at most this many training requests."""
    calibration_bins: int = 10
    """Equal-width predicted-probability bins of the calibration curve."""
    device: Device = Device.auto
    """auto = cuda when available."""
    catalog: CatalogEvalConfig = field(default_factory=CatalogEvalConfig)
    """Full-catalog ranking."""
    num_threads: int = 0
    """torch intra-op CPU threads (0 = torch's default). On a busy shared CPU, 1 avoids thread oversubscription
    (measured here: small-batch forwards 10-300x faster at load average 8 on 2 cores)."""
    progress: bool = True
    """tqdm progress bars."""

    def __post_init__(self) -> None:
        self.device = Device(self.device)
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")
        if self.batch_size < 1 or self.n_buckets < 1 or self.calibration_bins < 2 or self.cold_max_count < 0:
            raise ValueError("need batch_size >= 1, n_buckets >= 1, calibration_bins >= 2, cold_max_count >= 0")


def register_configs() -> None:
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
