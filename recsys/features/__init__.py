"""Unified tokenizer: behaviour sequences -> S tokens, non-sequential features -> NS tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

from recsys.reliability.lazy_exports import lazy_exports

# Imported on first access (PEP 562), as in ``recsys.data``: the configs (``recsys.features.config``,
# read when a CLI validates its overrides) must not pull in torch and torchrec.
_EXPORTS = {"TokenizedBatch": "tokenizer", "UnifiedTokenizer": "tokenizer"}

if TYPE_CHECKING:
    from recsys.features.tokenizer import TokenizedBatch, UnifiedTokenizer


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = ["TokenizedBatch", "UnifiedTokenizer"]
