"""Unified tokenizer: behaviour sequences -> S tokens, non-sequential features -> NS tokens."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Imported on first access (PEP 562), as in ``recsys.data``: the configs (``recsys.features.config``,
# read when a CLI validates its overrides) must not pull in torch and torchrec.
_EXPORTS = {"TokenizedBatch": "tokenizer", "UnifiedTokenizer": "tokenizer"}

if TYPE_CHECKING:
    from recsys.features.tokenizer import TokenizedBatch, UnifiedTokenizer


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


__all__ = ["TokenizedBatch", "UnifiedTokenizer"]
