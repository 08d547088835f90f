"""Structured config of ``python -m recsys.score`` (registered in Hydra's ConfigStore as ``score_schema``).

Every key of ``configs/score.yaml`` and every override is typed by these dataclasses, so a typo
fails at start-up. Fixed choices are ``str``-valued enums (OmegaConf rejects ``Literal``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from recsys.data.config import OovPolicy
from recsys.errors import InputError
from recsys.reliability.device import Device


class ScoreMode(str, Enum):
    """What is scored for each request."""

    candidates = "candidates"
    """The request's own candidates (ranking / CTR scoring)."""
    catalog = "catalog"
    """Every catalog item (or a given candidate set): full-catalog ranking, top-K written."""
    cascade = "cascade"
    """Retrieve candidates from the catalog (two-tower and/or SID retrievers), re-rank them, top-N written."""


class CascadeFusion(str, Enum):
    """How the cascade orders a request's retrieved union (``cascade.fusion``)."""

    ranker = "ranker"
    """By the ranker's logit of the ranked task."""
    rrf = "rrf"
    """Reciprocal-rank fusion of the ranker's order and every retriever's own order."""


class CatalogTarget(str, Enum):
    """Which of a request's listed candidates count as its held-out relevant items in catalog mode."""

    candidates = "candidates"
    """Every listed candidate, whatever its label (leave-one-out next-item data such as ml-100k)."""
    positives = "positives"
    """Only candidates whose label of the ranking task is 1."""


@dataclass
class CacheConfig:
    """Cross-request user KV cache (``recsys.serving.cache.UserKVCache``)."""

    enabled: bool = True
    """Reuse user states across requests (False: stage 1 once per request, shared by its candidates only)."""
    max_bytes: int = 512 * 2**20
    """Byte budget of the cache (K/V + stored layer inputs + event identities of every entry)."""
    reset_per_partition: bool = True
    """Empty the cache at the start of every output partition, so a partition's scores do not depend on
    which partitions ran before it in this process: a resumed run writes bit-identical files. Reuse then
    spans one partition (inputs sorted by user keep a user's requests together)."""

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise InputError(f"cache.max_bytes must be >= 0, got {self.max_bytes}")


@dataclass
class CatalogConfig:
    """Full-catalog ranking (``mode=catalog``)."""

    items_file: str | None = None
    """Parquet file with an ``item_id`` column (optional ``category``): the candidate set. None: every
    item id ``1 .. num_items-1`` of the checkpoint's schema."""
    category_files: list[str] = field(default_factory=list)
    """Extra request-row Parquet files (or directories) to learn the item -> category map from; the input
    files, and every split of the checkpoint's dataset when inputs default to it, are always read."""
    top_k: int = 100
    """Items written per request (best first)."""
    k: int = 10
    """Cut-off of HR@K / NDCG@K."""
    target: CatalogTarget = CatalogTarget.candidates
    """Which listed candidates are the request's held-out relevant items."""
    rank_task: str | None = None
    """Task whose score ranks the catalog (None: the first task)."""
    exclude_history: bool = False
    """Drop items of the request's (loader-truncated) history from its ranking (targets stay). Default
    False: seen items stay in the candidate set, the EVALUATION.md default."""

    def __post_init__(self) -> None:
        self.target = CatalogTarget(self.target)
        if self.top_k < 1 or self.k < 1:
            raise InputError(f"catalog.top_k and catalog.k must be >= 1, got {self.top_k}, {self.k}")


@dataclass
class CascadeConfig:
    """Retrieve -> rank (``mode=cascade``). The candidate set, categories and ranked task are ``catalog``'s
    (``items_file``, ``category_files``, ``rank_task``; HR/NDCG cut-off ``catalog.k``)."""

    retrievers: list[str] = field(default_factory=list)
    """Retriever artifact directories (``recsys.retrieval.artifact``), at most one per kind (two_tower, sid)."""
    retrieve_k: int = 100
    """Candidates each retriever returns per request (at most the catalog size: a larger value is refused)."""
    top_n: int = 10
    """Re-ranked items written per request (at most ``retrieve_k``)."""
    exclude_seen: bool = False
    """Retrieve no item of the request's (loader-truncated) history. Default False: seen items may be
    retrieved, like catalog mode's default."""
    target: CatalogTarget = CatalogTarget.positives
    """The request's relevant items: its candidates labelled 1 on the ranked task (default: clicked
    impressions), or every listed candidate (``candidates``: leave-one-out next-item data such as ml-100k,
    where the held-out item counts whatever its rating)."""

    fusion: CascadeFusion = CascadeFusion.ranker
    """Final order of the union: the ranker's logit (``ranker``), or reciprocal-rank fusion (``rrf``, Cormack et
    al. 2009): ``1 / (rrf_k + 1 + ranker rank) + sum_j 1 / (rrf_k + 1 + rank in retriever j's list)``, a list
    that lacks the item adding 0 (ranks 0-based; ties by item id). The written ``score_<task>`` stay the
    ranker's; ``rank`` is the fused order."""
    rrf_k: int = 60
    """``rrf``'s smoothing constant (60: the paper's; larger flattens the weight of the top ranks)."""

    def __post_init__(self) -> None:
        self.target = CatalogTarget(self.target)
        self.fusion = CascadeFusion(self.fusion)
        if self.rrf_k < 0:
            raise InputError(f"cascade.rrf_k must be >= 0, got {self.rrf_k}")
        if self.retrieve_k < 1 or self.top_n < 1:
            raise InputError(f"cascade.retrieve_k and cascade.top_n must be >= 1, got {self.retrieve_k}, {self.top_n}")
        if self.top_n > self.retrieve_k:
            raise InputError(f"cascade.top_n={self.top_n} exceeds cascade.retrieve_k={self.retrieve_k}: a request "
                             "is re-ranked among at least retrieve_k candidates only; raise retrieve_k or lower top_n")


@dataclass
class ScoreConfig:
    """Top-level config of the batch scoring job (configs/score.yaml)."""

    checkpoint: str = MISSING
    """A ``step_<N>.pt`` file, or a training output dir (its newest ``checkpoints/step_<N>.pt``)."""
    output_dir: str = MISSING
    """Where ``part-<i>.parquet``, ``_job.json`` and ``summary.json`` go."""
    inputs: list[str] = field(default_factory=list)
    """Request-row Parquet files or directories; empty = split ``split`` of the checkpoint's dataset."""
    split: str = "test"
    """Split of the checkpoint's dataset scored when ``inputs`` is empty."""
    inputs_eventlog: str | None = None
    """A new event log of the checkpoint's catalog (data.source=eventlog checkpoints): ingested with the
    stored id maps of the checkpoint's dataset (its columns and options; ``data.eventlog.id_maps_from``),
    every request scored. Not with ``inputs``."""
    oov_policy: OovPolicy | None = None
    """``inputs_eventlog``: an item / action the stored maps lack is refused (error) or scored as the
    unknown id 0 (oov), counted in the summary; None = the checkpoint's data.oov_policy."""
    mode: ScoreMode = ScoreMode.candidates
    """candidates: score each request's candidates; catalog: rank the whole catalog."""
    rows_per_partition: int = 2048
    """Input requests per output partition (the unit of atomic writes and of resume)."""
    batch_size: int = 64
    """Requests per model batch (batches never straddle partitions)."""
    candidate_chunk: int = 512
    """Candidate rows per stage-2 call: transient memory grows with this, not with C."""
    max_len: int | None = None
    """Events kept per sequence kind (None: the checkpoint's data.loader.max_len, as in training). Another
    value is refused unless ``allow_max_len_change``: the scores would silently differ from training's."""
    allow_max_len_change: bool = False
    """Opt-in to score with a ``max_len`` *below* the trained one on purpose (e.g. a latency study); a
    value above it is always refused (the model's pyramid was sized for the trained length)."""
    device: Device = Device.auto
    """auto = cuda when available."""
    num_threads: int = 0
    """torch intra-op CPU threads (0 = torch's default). Small models on a busy machine run faster on 1."""
    attention_backend: str | None = None
    """Override of the model's attention backend (reference / torch / triton / auto); None keeps it."""
    item_content: str | None = None
    """Parquet (item_id, vector) of items to give a semantic ID at load time (SID checkpoints only)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """Cross-request user KV cache."""
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    """Full-catalog mode settings (the cascade's candidate set and ranked task too)."""
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    """Retrieve -> rank mode settings."""
    overwrite: bool = False
    """When output_dir holds partitions of a *different* scoring job (other checkpoint / inputs / settings):
    delete them (True) or refuse to start (False). Never deletes files no scoring job wrote (no
    ``_job.json``), and an output_dir overlapping an input is refused either way."""
    max_partitions: int = 0
    """Stop after this many partitions in this run (0 = all); a later run resumes."""
    pause_after_partition_s: float = 0.0
    """Sleep after each written partition (kill/resume drills and tests only)."""
    progress: bool = True
    """tqdm progress bar."""

    def __post_init__(self) -> None:
        self.mode = ScoreMode(self.mode)
        self.device = Device(self.device)
        if self.num_threads < 0:
            raise InputError(f"num_threads must be >= 0, got {self.num_threads}")
        for name in ("rows_per_partition", "batch_size", "candidate_chunk"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_len is not None and (isinstance(self.max_len, bool) or self.max_len < 1):
            raise InputError(f"max_len must be a positive integer (or null for the trained value), got {self.max_len}")
        if self.max_partitions < 0 or self.pause_after_partition_s < 0:
            raise InputError(f"max_partitions and pause_after_partition_s must be >= 0, got {self.max_partitions}, "
                             f"{self.pause_after_partition_s}")
        self._check_eventlog()
        if self.mode == ScoreMode.cascade and not self.cascade.retrievers:
            raise InputError("mode=cascade needs cascade.retrievers=[<artifact dir>, ...] (a two_tower and/or a sid "
                             "retriever artifact, recsys.retrieval.artifact)")
        if self.attention_backend is not None:
            from kernels.backend import AttentionBackend

            AttentionBackend(self.attention_backend)  # an unknown name fails at start-up


    def _check_eventlog(self) -> None:
        if self.oov_policy is not None:
            self.oov_policy = OovPolicy(self.oov_policy)
        if self.inputs_eventlog is None:
            if self.oov_policy is not None:
                raise InputError(f"oov_policy={self.oov_policy.value} is set, but only inputs_eventlog reads it (the "
                                 "ids of prepared request files are already encoded): drop it, or add inputs_eventlog")
            return
        if self.inputs:
            raise InputError(f"inputs_eventlog={self.inputs_eventlog} and inputs={list(self.inputs)} are both set: "
                             "score either a new event log or prepared request files, not both")
        path = Path(self.inputs_eventlog)
        if not path.is_file():
            raise InputError(f"inputs_eventlog={self.inputs_eventlog} "
                             f"{'is not a file' if path.exists() else 'does not exist'}")
        self.inputs_eventlog = str(path.resolve())


def register_configs() -> None:
    ConfigStore.instance().store(name="score_schema", node=ScoreConfig)
