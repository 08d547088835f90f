"""Comparison baselines: popularity, DLRM-, DIN- and SASRec-style models (``model.arch``).

The factory that builds any of them (or the OneTrans ranker) is ``recsys.baselines.factory.build_model``.
"""

from __future__ import annotations

from recsys.baselines.common import Baseline
from recsys.baselines.din import DINModel
from recsys.baselines.dlrm import DLRMModel
from recsys.baselines.popularity import PopularityModel
from recsys.baselines.sasrec import SASRecModel

__all__ = ["Baseline", "DINModel", "DLRMModel", "PopularityModel", "SASRecModel"]
