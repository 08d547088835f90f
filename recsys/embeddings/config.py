"""How items are embedded (``model.item_embedding``; composed into ``ModelConfig``, YAML keys unchanged)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


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
