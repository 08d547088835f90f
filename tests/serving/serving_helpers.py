"""Request rows with explicit histories, collated by the real loader code (so truncation is real)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from recsys.data.batch import RequestBatch
from recsys.data.collate import collate
from recsys.data.schema import DataSchema
from recsys.model.config import ModelConfig, PyramidConfig
from recsys.model.ranker import OneTransRanker
from recsys.testing import tiny_schema

SCHEMA = tiny_schema()


@dataclass
class Row:
    """One request: ``events[kind]`` = list of (item, category, action, ts), oldest first."""

    user_id: int
    request_ts: int
    events: dict[str, list[tuple[int, int, int, int]]]
    cands: list[tuple[int, int]]
    request_id: int = 0
    sparse: list[int] = field(default_factory=lambda: [1, 2])
    dense: list[float] = field(default_factory=lambda: [0.5, -1.0])


def random_history(rng: np.random.Generator, schema: DataSchema, counts: dict[str, int], t0: int = 1000,
                   ) -> dict[str, list[tuple[int, int, int, int]]]:
    """Random events per kind with strictly increasing, interleaved timestamps (some equal across kinds)."""
    out = {}
    for k in schema.sequences:
        n = counts.get(k, 0)
        ts = t0 + np.cumsum(rng.integers(0, 500, size=n))  # 0 gaps: ties in time within and across kinds
        out[k] = [(int(rng.integers(1, schema.num_items)), int(rng.integers(1, schema.num_categories)),
                   int(rng.integers(1, schema.num_actions)), int(t)) for t in ts]
    return out


def prefix_history(events: dict[str, list], counts: dict[str, int]) -> dict[str, list]:
    """The first ``counts[kind]`` events of each kind."""
    return {k: v[:counts.get(k, 0)] for k, v in events.items()}


def history_before(events: dict[str, list], t: int) -> dict[str, list]:
    """Every event strictly before time ``t`` (what a request at time ``t`` sees)."""
    return {k: [e for e in v if e[3] < t] for k, v in events.items()}


def random_cands(rng: np.random.Generator, n: int, schema: DataSchema = SCHEMA) -> list[tuple[int, int]]:
    return [(int(rng.integers(1, schema.num_items)), int(rng.integers(1, schema.num_categories))) for _ in range(n)]


def collate_rows(rows: list[Row], schema: DataSchema = SCHEMA, max_len: int = 1000) -> RequestBatch:
    """Arrow table of the data contract -> ``collate`` (keeps the last ``max_len`` events per kind)."""
    data: dict[str, list] = {"request_id": [r.request_id for r in rows], "user_id": [r.user_id for r in rows],
                             "request_ts": [r.request_ts for r in rows]}
    for i, f in enumerate(schema.sparse):
        data[f.name] = [r.sparse[i] for r in rows]
    for i, d in enumerate(schema.dense):
        data[d] = [r.dense[i] for r in rows]
    for k in schema.sequences:
        for j, fld in enumerate(("item_id", "category", "action", "ts")):
            data[schema.seq_col(k, fld)] = [[e[j] for e in r.events.get(k, [])] for r in rows]
    data["cand_item_id"] = [[c[0] for c in r.cands] for r in rows]
    data["cand_category"] = [[c[1] for c in r.cands] for r in rows]
    for t in schema.tasks:
        data[f"cand_label_{t}"] = [[float(i % 2) for i in range(len(r.cands))] for r in rows]
    table = pa.Table.from_pydict(data, schema=schema.arrow_schema())
    return collate(table, schema, max_len)


def make_model(n_layers: int = 2, pyramid: PyramidConfig | None = None, max_s: int = 64, d_model: int = 16,
               seq_merge: str = "time_interleaved", backend: str = "torch", **config) -> OneTransRanker:
    """A small eval-mode ranker; ``config``: further ``ModelConfig`` fields (e.g. ``dense_bf16=True``)."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=d_model, n_heads=2, n_layers=n_layers, ffn_mult=2, n_ns_tokens=3, emb_dim=8,
                      head_hidden=16, pyramid=pyramid or PyramidConfig(mode="none"), attention_backend=backend,
                      seq_merge=seq_merge, **config)
    return OneTransRanker(SCHEMA, cfg, max_s_tokens=max_s).eval()
