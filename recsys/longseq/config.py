"""Configuration of the long-sequence extensions (model config sub-dataclass ``model.long_seq``).

Both parts are off by default, so a model built from a config without them is unchanged
(same parameters, same NS token count, same outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class SearchMode(str, Enum):
    """Which search-based selection(s) over the full history feed extra NS tokens."""

    none = "none"
    hard = "hard"
    """Events of the candidate's category, most recent first (SIM hard search)."""
    soft = "soft"
    """Top-K events by inner product in a separate, decoupled embedding space (SIM soft search)."""
    both = "both"
    """Hard and soft: one NS token each."""


@dataclass
class LongSeqConfig:
    """Long behaviour histories beyond the loader's S-token window (``data.loader.long_max_len``).

    Every enabled part adds NS tokens to each candidate (memory: 1; search: 1 per mode), so the
    user-side S-token KV cache stays valid. Needs batches with a long history
    (``data.loader.long_max_len > 0``).
    """

    memory: bool = False
    """Vector-quantized long-term memory of the events older than the S-token window."""
    codebook_size: int = 64
    """M: codes of the memory's key codebook; per-user state is M x (D + 1) floats."""
    key_dim: int = 16
    """Width of memory keys / codewords and of the decoupled search space."""
    search: SearchMode = SearchMode.none
    """Search-based selection over the full long history (events in the window included)."""
    search_k: int = 32
    """K: events selected per candidate by each search."""

    @property
    def enabled(self) -> bool:
        return self.memory or self.search != SearchMode.none

    def __post_init__(self) -> None:
        self.search = SearchMode(self.search)
        for name in ("codebook_size", "key_dim", "search_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.long_seq.{name} must be >= 1, got {getattr(self, name)}")
