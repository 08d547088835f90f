"""Semantic-ID quantization: item content vectors -> RQ-KMeans / RQ-VAE / multi-expert codes,
unique per item, with a report; ``SemanticIds`` is what the ranker and checkpoints carry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from recsys.reliability.lazy_exports import lazy_exports

# Submodule of every public name, imported on first access (PEP 562): an entry point that imports
# this package's config module refuses a bad config before paying for torch / torchrec.
_EXPORTS = {
    "SemanticIds": "artifact",
}

if TYPE_CHECKING:  # static analysers see the eager imports
    from recsys.quant.artifact import SemanticIds


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = ["SemanticIds"]
