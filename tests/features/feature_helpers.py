"""Helpers of the feature-pipeline tests: real request Parquet, a small ranker, a host-sync counter."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.overrides import TorchFunctionMode

from recsys.data.schema import DataSchema
from recsys.model.config import ModelConfig, PyramidConfig
from recsys.model.ranker import OneTransRanker
from recsys.testing import tiny_schema

SCHEMA = tiny_schema()
SYNC_METHODS = frozenset({"item", "tolist", "__int__", "__index__", "__bool__", "__float__", "numpy", "cpu"})
"""Tensor methods that read a value back to the host (a device sync on an accelerator)."""
REPO = Path(__file__).resolve().parents[2]


def request_table(n: int, seed: int, schema: DataSchema = SCHEMA, max_hist: int = 12) -> pa.Table:
    """``n`` random request rows of the data contract (histories 0..max_hist per kind, 1..4 candidates,
    timestamps with ties across kinds)."""
    rng = np.random.default_rng(seed)
    data: dict[str, list] = {"request_id": list(range(n)), "user_id": rng.integers(0, 5, n).tolist(),
                             "request_ts": (10**6 + rng.integers(0, 10**4, n)).tolist()}
    for f in schema.sparse:
        data[f.name] = rng.integers(0, f.num_embeddings, n).tolist()
    for d in schema.dense:
        data[d] = rng.normal(size=n).astype(np.float32).tolist()
    sizes = {"item_id": schema.num_items, "category": schema.num_categories, "action": schema.num_actions}
    for k in schema.sequences:
        lens = rng.integers(0, max_hist + 1, n)
        for fld, size in sizes.items():
            data[schema.seq_col(k, fld)] = [rng.integers(0, size, m).tolist() for m in lens]
        data[schema.seq_col(k, "ts")] = [sorted((ts - rng.integers(0, 5000, m) // 7 * 7).tolist())
                                         for ts, m in zip(data["request_ts"], lens)]
    cands = rng.integers(1, 5, n)
    data["cand_item_id"] = [rng.integers(0, schema.num_items, c).tolist() for c in cands]
    data["cand_category"] = [rng.integers(0, schema.num_categories, c).tolist() for c in cands]
    for t in schema.tasks:
        data[f"cand_label_{t}"] = [rng.integers(0, 2, c).astype(float).tolist() for c in cands]
    return pa.Table.from_pydict(data, schema=schema.arrow_schema())


def write_requests(path: Path, n: int, seed: int, row_group_size: int = 16) -> Path:
    pq.write_table(request_table(n, seed), path, row_group_size=row_group_size)
    return path


def make_ranker(n_layers: int = 2, **kw: object) -> OneTransRanker:
    torch.manual_seed(0)
    kw = {"pyramid": PyramidConfig(mode="linear", final=0, round_to=2), **kw}
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=n_layers, ffn_mult=2, n_ns_tokens=3, emb_dim=8,
                      head_hidden=16, attention_backend="torch", **kw)
    return OneTransRanker(SCHEMA, cfg, max_s_tokens=32)


def _origin() -> str:
    """Where a sync was asked for: ``kernels``, ``torchrec`` or ``recsys`` (first frame outside torch)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "/torch/" not in name and name != __file__:
            break
        frame = frame.f_back
    name = "" if frame is None else frame.f_code.co_filename
    for part in ("kernels", "torchrec", "fbgemm_gpu"):
        if f"/{part}/" in name:
            return part
    return f"{Path(name).name}:{frame.f_lineno}" if frame is not None else "?"


class HostSyncCounter(TorchFunctionMode):
    """Counts tensor -> host reads (``Tensor.item``, ``tolist``, ``__int__``, ...) made under it, by origin.

    ``torch.arange(tensor)`` and ``repeat_interleave`` without ``output_size`` read sizes inside C++,
    out of its sight: the code under test passes Python sizes to both.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if getattr(func, "__name__", "") in SYNC_METHODS:
            self.calls[_origin()] += 1
        return func(*args, **(kwargs or {}))

    def outside(self, *allowed: str) -> dict[str, int]:
        """Counts of every origin not in ``allowed``."""
        return {k: v for k, v in self.calls.items() if k not in allowed}
