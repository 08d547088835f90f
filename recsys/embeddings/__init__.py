"""torchrec embedding tables for sequence, candidate and user/context id features."""

from __future__ import annotations

from typing import TYPE_CHECKING

from recsys.reliability.lazy_exports import lazy_exports

# Imported on first access (PEP 562), as in ``recsys.data``: the configs (``recsys.embeddings.config``,
# read when a CLI validates its overrides) must not pull in torch and torchrec.
_EXPORTS = {"FeatureEmbeddings": "tables"}

if TYPE_CHECKING:
    from recsys.embeddings.tables import FeatureEmbeddings


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = ["FeatureEmbeddings"]
