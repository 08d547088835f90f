"""torchrec embedding tables for sequence, candidate and user/context id features."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Imported on first access (PEP 562), as in ``recsys.data``: the configs (``recsys.embeddings.config``,
# read when a CLI validates its overrides) must not pull in torch and torchrec.
_EXPORTS = {"FeatureEmbeddings": "tables"}

if TYPE_CHECKING:
    from recsys.embeddings.tables import FeatureEmbeddings


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


__all__ = ["FeatureEmbeddings"]
