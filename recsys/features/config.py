"""Tokenizer-side configuration: the fields of ``ModelConfig`` the tokenizer and its tables read.

``ModelConfig`` (``recsys.model.config``) extends :class:`TokenizerConfig`, so the YAML keys
(``model.seq_merge``, ``model.item_embedding.mode``, ...) are the same flat keys as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from recsys.data.config import TIME_GAP_BUCKETS
from recsys.embeddings.config import ItemEmbeddingConfig
from recsys.longseq.config import LongSeqConfig

# Fixed choices are str-valued enums, not Literal: OmegaConf rejects Literal annotations,
# while an enum is checked at merge time, so a typo in YAML or an override fails at start-up.


class SeqMerge(str, Enum):
    time_interleaved = "time_interleaved"
    intent_grouped = "intent_grouped"


class NsTokenizer(str, Enum):
    auto_split = "auto_split"
    group_wise = "group_wise"


@dataclass
class TokenizerConfig:
    """Token widths and tokenizer choices (``recsys.features.tokenizer``)."""

    d_model: int = 64
    """Token width D."""
    n_ns_tokens: int = 4
    """NS tokens per candidate for auto-split (group-wise uses one token per feature group)."""
    emb_dim: int = 32
    """Width of every torchrec embedding table."""
    time_gap_buckets: int = TIME_GAP_BUCKETS
    """log2 buckets of time gaps (between events of a kind, and request time - newest event); bucket 0 is
    reserved. Bucketing runs in the loader (``RequestLoader(time_gap_buckets=...)`` must match)."""
    seq_merge: SeqMerge = SeqMerge.time_interleaved
    """How several behaviour sequences become one S-token sequence."""
    ns_tokenizer: NsTokenizer = NsTokenizer.auto_split
    """How non-sequential features become NS tokens."""
    ns_recent_events: int = 0
    """Per kind, the R most recent events' embeddings join the user-side NS features (0 = off)."""
    ns_cross: bool = True
    """auto_split: add a multiplicative user x candidate term ``(U user) * (V cand)`` to the NS
    MLP's hidden layer (explicit feature crossing; the user factor is still computed once per request)."""
    ns_seen_item: bool = False
    """Give every candidate a "seen" input: 1 when its item id is in the request's history (any kind, as
    the loader truncated it), else 0, appended to the candidate features of the NS tokenizer. What the
    ranker makes of it is learnt: on a log where nobody takes an item twice (ml-100k) it learns "not one
    of my history items", on one with repeat consumption the opposite. Trained with negatives that can
    be history items (``train.hard_negatives``: history items are eligible by default)."""
    item_embedding: ItemEmbeddingConfig = field(default_factory=ItemEmbeddingConfig)
    """Item id / semantic-ID embeddings (default: id, the plain id table)."""
    long_seq: LongSeqConfig = field(default_factory=LongSeqConfig)
    """Long histories beyond the S-token window: VQ memory / search NS tokens (default: off)."""

    def __post_init__(self) -> None:
        if self.ns_recent_events < 0:
            raise ValueError(f"model.ns_recent_events must be >= 0, got {self.ns_recent_events}")
        for name in ("d_model", "n_ns_tokens", "emb_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.time_gap_buckets < 2:
            raise ValueError("model.time_gap_buckets must be >= 2")
        self.seq_merge = SeqMerge(self.seq_merge)  # a plain string (tests, checkpoints) -> enum, or ValueError
        self.ns_tokenizer = NsTokenizer(self.ns_tokenizer)
        if isinstance(self.item_embedding, dict):  # plain construction from a dict (tests, checkpoints)
            self.item_embedding = ItemEmbeddingConfig(**self.item_embedding)
        if isinstance(self.long_seq, dict):
            self.long_seq = LongSeqConfig(**self.long_seq)
