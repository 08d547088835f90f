"""Configuration of the OneTrans-style ranker (Hydra structured config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from kernels.backend import AttentionBackend
from recsys.longseq.config import LongSeqConfig

# Fixed choices are str-valued enums, not Literal: OmegaConf rejects Literal annotations,
# while an enum is checked at merge time, so a typo in YAML or an override fails at start-up.


class PyramidMode(str, Enum):
    none = "none"
    linear = "linear"
    explicit = "explicit"


class SeqMerge(str, Enum):
    time_interleaved = "time_interleaved"
    intent_grouped = "intent_grouped"


class NsTokenizer(str, Enum):
    auto_split = "auto_split"
    group_wise = "group_wise"


class Arch(str, Enum):
    """Which model `recsys.baselines.build_model` builds (the ranker, or a baseline of issue 10)."""

    onetrans = "onetrans"
    popularity = "popularity"
    dlrm = "dlrm"
    din = "din"
    sasrec = "sasrec"


class Backend(str, Enum):
    """Config-side name of a ``kernels.AttentionBackend`` (same values). OmegaConf matches enum
    *names*, and the kernel enum's names are upper case, so configs use this lower-case twin."""

    reference = "reference"
    torch = "torch"
    triton = "triton"
    auto = "auto"


@dataclass
class PyramidConfig:
    """How many S-token queries each layer keeps (see `PyramidSchedule`)."""

    mode: PyramidMode = PyramidMode.linear
    """none: every layer keeps all S tokens; linear: shrink from all to `final` by the top layer;
    explicit: the list in `queries`."""
    queries: list[int] = field(default_factory=list)
    """explicit mode: S-query count per layer (non-increasing, one entry per layer)."""
    final: int = 0
    """linear mode: S queries kept by the top layer (0 = top layer carries NS tokens only)."""
    round_to: int = 8
    """linear mode: round intermediate counts up to a multiple of this (the paper uses 32)."""

    def __post_init__(self) -> None:
        self.mode = PyramidMode(self.mode)
        if self.final < 0 or self.round_to < 1:
            raise ValueError("pyramid.final must be >= 0 and pyramid.round_to >= 1")


class ItemEmbeddingMode(str, Enum):
    id = "id"
    sid = "sid"
    both = "both"


class SidCombine(str, Enum):
    sum = "sum"
    concat = "concat"


@dataclass
class ItemEmbeddingConfig:
    """How an item (behaviour events and candidates alike) is embedded (``recsys/embeddings/tables.py``)."""

    mode: ItemEmbeddingMode = ItemEmbeddingMode.id
    """id: its (hashed) id row; sid: its semantic-ID codes only; both: the sum of the two (the id table
    then starts at zero, so an item never trained on is embedded by its SID alone)."""
    sid_path: str | None = None
    """sids.pt written by ``python -m recsys.quant`` (sid/both: read by training; checkpoints carry it)."""
    sid_columns: int = 0
    """Semantic code columns embedded (0 = all of sid_path's; set from the file at training time)."""
    sid_codebook_size: int = 0
    """Codes per column (0 = from sid_path); each column's table has one extra row for "no SID"."""
    combine: SidCombine = SidCombine.sum
    """sum of the per-column code embeddings (width E each), or concat (width E / columns each)."""
    hash_buckets: int = 0
    """Rows of the item id table: 0 = one per item id; > 0 = a multiplicative hash of the id mod this."""

    def __post_init__(self) -> None:
        self.mode = ItemEmbeddingMode(self.mode)
        self.combine = SidCombine(self.combine)
        if self.sid_columns < 0 or self.sid_codebook_size < 0 or self.hash_buckets < 0:
            raise ValueError("model.item_embedding.sid_columns, sid_codebook_size, hash_buckets must be >= 0")


@dataclass
class ModelConfig:
    """OneTrans ranker sizes and tokenizer choices. Sizes: configs/model/{debug,small,base}.yaml."""

    arch: Arch = Arch.onetrans
    """Model family: the OneTrans ranker, or a baseline (configs/model/{popularity,dlrm,din,sasrec}.yaml;
    baselines read d_model, n_heads, n_layers, emb_dim, head_hidden and the fields below)."""
    history_cap: int = 0
    """Baselines: events kept per sequence kind, newest first (0 = all the loader gives)."""
    next_item_weight: float = 1.0
    """sasrec: weight of the full-catalog next-item softmax loss added to the task BCE."""
    d_model: int = 64
    """Token width D."""
    n_heads: int = 4
    """Attention heads H (D must be divisible by H)."""
    n_layers: int = 2
    """Stacked OneTrans blocks."""
    ffn_mult: int = 4
    """FFN hidden width = ffn_mult * D."""
    n_ns_tokens: int = 4
    """NS tokens per candidate for auto-split (group-wise uses one token per feature group)."""
    emb_dim: int = 32
    """Width of every torchrec embedding table."""
    time_gap_buckets: int = 32
    """log2 buckets of (request_ts - event_ts); bucket 0 is reserved."""
    seq_merge: SeqMerge = SeqMerge.time_interleaved
    """How several behaviour sequences become one S-token sequence."""
    ns_tokenizer: NsTokenizer = NsTokenizer.auto_split
    """How non-sequential features become NS tokens."""
    rope: bool = True
    """Rotary positions in attention (S position = index from the oldest event; NS = S length + n)."""
    ns_recent_events: int = 0
    """Per kind, the R most recent events' embeddings join the user-side NS features (0 = off)."""
    ns_cross: bool = True
    """auto_split: add a multiplicative user x candidate term ``(U user) * (V cand)`` to the NS
    MLP's hidden layer (explicit feature crossing; the user factor is still computed once per request)."""
    head_hidden: int = 64
    """Hidden width of the task-head MLP."""
    pyramid: PyramidConfig = field(default_factory=PyramidConfig)
    """Pyramid stacking schedule."""
    item_embedding: ItemEmbeddingConfig = field(default_factory=ItemEmbeddingConfig)
    """Item id / semantic-ID embeddings (default: id, the plain id table)."""
    long_seq: LongSeqConfig = field(default_factory=LongSeqConfig)
    """Long histories beyond the S-token window: VQ memory / search NS tokens (default: off)."""
    attention_backend: Backend = Backend.auto
    """Attention implementation (kernels/); auto = triton on CUDA, torch on CPU."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.ns_recent_events < 0:
            raise ValueError(f"model.ns_recent_events must be >= 0, got {self.ns_recent_events}")
        for name in ("d_model", "n_heads", "n_layers", "ffn_mult", "n_ns_tokens", "emb_dim", "head_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.time_gap_buckets < 2:
            raise ValueError("model.time_gap_buckets must be >= 2")
        self.seq_merge = SeqMerge(self.seq_merge)  # a plain string (tests, checkpoints) -> enum, or ValueError
        self.ns_tokenizer = NsTokenizer(self.ns_tokenizer)
        self.attention_backend = Backend(self.attention_backend)
        self.arch = Arch(self.arch)
        if self.history_cap < 0 or self.next_item_weight < 0:
            raise ValueError("model.history_cap and model.next_item_weight must be >= 0")
        AttentionBackend(self.attention_backend.value)  # the kernels know every config name
        if isinstance(self.pyramid, dict):  # plain construction from a dict (tests, checkpoints)
            self.pyramid = PyramidConfig(**self.pyramid)
        if isinstance(self.item_embedding, dict):
            self.item_embedding = ItemEmbeddingConfig(**self.item_embedding)
        if isinstance(self.long_seq, dict):
            self.long_seq = LongSeqConfig(**self.long_seq)
        if self.pyramid.mode == "explicit" and len(self.pyramid.queries) != self.n_layers:
            raise ValueError(f"pyramid.queries has {len(self.pyramid.queries)} entries, "
                             f"expected one per layer ({self.n_layers})")
