"""Semantic-ID quantization: item content vectors -> RQ-KMeans / RQ-VAE / multi-expert codes,
unique per item, with a report; ``SemanticIds`` is what the ranker and checkpoints carry."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Submodule of every public name, imported on first access (PEP 562): an entry point that imports
# this package's config module refuses a bad config before paying for torch / torchrec.
_EXPORTS = {
    "SemanticIds": "artifact",
}

if TYPE_CHECKING:  # static analysers see the eager imports
    from recsys.quant.artifact import SemanticIds


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


__all__ = ["SemanticIds"]
