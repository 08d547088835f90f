"""Configuration of the OneTrans-style ranker (Hydra structured config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from kernels.backend import AttentionBackend
from recsys.embeddings.config import ItemEmbeddingConfig, ItemEmbeddingMode, SidCombine
from recsys.errors import InputError
from recsys.features.config import NsTokenizer, SeqMerge, TokenizerConfig

__all__ = ["Arch", "Backend", "ItemEmbeddingConfig", "ItemEmbeddingMode", "ModelConfig", "NsTokenizer",
           "PyramidConfig", "PyramidMode", "SeqMerge", "SidCombine", "TargetItems", "TokenizerConfig"]

# Fixed choices are str-valued enums, not Literal: OmegaConf rejects Literal annotations,
# while an enum is checked at merge time, so a typo in YAML or an override fails at start-up.


class PyramidMode(str, Enum):
    none = "none"
    linear = "linear"
    explicit = "explicit"


class Arch(str, Enum):
    """Which model `recsys.baselines.build_model` builds (the ranker, or a baseline of issue 10)."""

    onetrans = "onetrans"
    popularity = "popularity"
    dlrm = "dlrm"
    din = "din"
    sasrec = "sasrec"
    two_tower = "two_tower"  # the two-tower retriever (recsys.retrieval.two_tower_model), built by the train layer
    sid_decoder = "sid_decoder"  # the generative SID retriever (recsys.retrieval.sid_decoder_model), ditto


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


class TargetItems(str, Enum):
    """Which of a request's candidates are next-item targets: what the SID decoder is trained to generate
    (``RetrievalTrainConfig.sid_targets``), what the retrievers' and SASRec's validation recall counts
    (``valid_targets``)."""

    positives = "positives"
    candidates = "candidates"


@dataclass
class RetrievalTrainConfig:
    """``model.arch=two_tower``: vector width, loss and validation settings (recsys.retrieval.two_tower_model);
    ``model.arch=sid_decoder`` reads ``recall_k`` (its beam width in validation) and ``sid_targets``."""

    out_dim: int = 32
    """Width O of the user / item vectors."""
    temperature: float = 1.0
    """Logits are u.v / tau; the vectors are not normalised (serving scores raw inner products)."""
    num_negatives: int = 512
    """Uniform negatives per batch on top of the in-batch targets (sampled softmax)."""
    full_softmax_max_items: int = 4096
    """Catalogs with at most this many rows use the exact full softmax."""
    recall_k: int = 10
    """Validation metric: recall@K of the valid split's positives (exact faiss index, history allowed)."""
    max_positions: int = 0
    """two_tower: train each request's newest ``max_positions`` next-item positions only (0 = every one). A
    log with a request per event (ml-100k: one per rating, each holding all the user's earlier ratings)
    repeats event ``j`` as a target in every later request of its user: with 0 an event early in a long
    history is trained hundreds of times an epoch and short prefixes dominate the loss; with N every event
    is trained about N times an epoch, at every history length alike."""
    valid_targets: TargetItems = TargetItems.positives
    """two_tower / sid_decoder / sasrec: the items ``valid_recall@K`` counts: the valid split's candidates
    labelled 1 on the first task, or every candidate (a log of what users chose: ml-100k's next-item
    protocol ranks the rated movie whatever the rating, 943 validation targets instead of 493 liked)."""
    sid_targets: TargetItems = TargetItems.positives
    """sid_decoder: which candidates of a training request it learns to generate: those labelled 1 on the
    first task, or every candidate (a log of what users chose, e.g. every rating; candidates must then
    be no sampled negatives)."""

    def __post_init__(self) -> None:
        self.sid_targets = TargetItems(self.sid_targets)
        self.valid_targets = TargetItems(self.valid_targets)
        if self.max_positions < 0:
            raise InputError(f"model.retrieval.max_positions must be >= 0 (0 = every position), got {self.max_positions}")


@dataclass
class ModelConfig(TokenizerConfig):
    """OneTrans ranker sizes and tokenizer choices. Sizes: configs/model/{debug,small,base}.yaml.

    The tokenizer's fields (d_model, emb_dim, time_gap_buckets, seq_merge, ns_*, item_embedding,
    long_seq) are inherited from :class:`~recsys.features.config.TokenizerConfig`: same flat YAML keys.
    """

    arch: Arch = Arch.onetrans
    """Model family: the OneTrans ranker, or a baseline (configs/model/{popularity,dlrm,din,sasrec}.yaml;
    baselines read d_model, n_heads, n_layers, emb_dim, head_hidden and the fields below)."""
    history_cap: int = 0
    """Baselines: events kept per sequence kind, newest first (0 = all the loader gives)."""
    next_item_weight: float = 1.0
    """sasrec: weight of the full-catalog next-item softmax loss added to the task BCE."""
    n_heads: int = 4
    """Attention heads H (D must be divisible by H)."""
    n_layers: int = 2
    """Stacked OneTrans blocks."""
    ffn_mult: int = 4
    """FFN hidden width = ffn_mult * D."""
    rope: bool = True
    """Rotary positions in attention (S position = index from the oldest event; NS = S length + n)."""
    dense_bf16: bool = False
    """The blocks' projections and FFNs (S and NS) as bf16 matmuls from fp32 master weights; the residual
    stream, norms, rotary and attention stay fp32 (unlike ``train.bf16`` autocast, which also runs the
    attention and elementwise ops in bf16). Applies in training and scoring alike."""
    head_hidden: int = 64
    """Hidden width of the task-head MLP."""
    pyramid: PyramidConfig = field(default_factory=PyramidConfig)
    """Pyramid stacking schedule."""
    attention_backend: Backend = Backend.auto
    """Attention implementation (kernels/); auto = triton on CUDA, torch on CPU."""
    retrieval: RetrievalTrainConfig = field(default_factory=RetrievalTrainConfig)
    """Retrievers (two_tower, sid_decoder): vector width, loss, validation recall@K."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        for name in ("n_heads", "n_layers", "ffn_mult", "head_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        self.attention_backend = Backend(self.attention_backend)
        self.arch = Arch(self.arch)
        if self.history_cap < 0 or self.next_item_weight < 0:
            raise ValueError("model.history_cap and model.next_item_weight must be >= 0")
        AttentionBackend(self.attention_backend.value)  # the kernels know every config name
        if isinstance(self.retrieval, dict):
            self.retrieval = RetrievalTrainConfig(**self.retrieval)
        if isinstance(self.pyramid, dict):  # plain construction from a dict (tests, checkpoints)
            self.pyramid = PyramidConfig(**self.pyramid)
        if self.pyramid.mode == "explicit" and len(self.pyramid.queries) != self.n_layers:
            raise ValueError(f"pyramid.queries has {len(self.pyramid.queries)} entries, "
                             f"expected one per layer ({self.n_layers})")
