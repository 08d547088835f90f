"""Evaluation report of a trained model (``python -m recsys.evaluate``): metrics.json + PNG plots."""

from __future__ import annotations

from typing import TYPE_CHECKING

from recsys.reliability.lazy_exports import lazy_exports

# Submodule of every public name, imported on first access (PEP 562): an entry point that imports
# this package's config module refuses a bad config before paying for torch / torchrec.
_EXPORTS = {
    "run_evaluation": "run",
}

if TYPE_CHECKING:  # static analysers see the eager imports
    from recsys.evaluate.run import run_evaluation


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = ["run_evaluation"]
