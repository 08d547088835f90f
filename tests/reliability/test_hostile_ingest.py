"""Hostile event logs through ``ingest_event_log``: one heavy user's ingest allocates O(events), not
O(history pairs), and its rows match a brute force."""

from __future__ import annotations

import tracemalloc

import numpy as np
import polars as pl

from recsys.data.history import HistorySlices, attach_history
from recsys.data.ingest import ingest_event_log
from recsys.data.parquet_io import to_arrow

T0 = 1_700_000_000  # a plausible epoch second


def brute_history(ts: np.ndarray, items: np.ndarray, t: int, max_history: int | None) -> list[int]:
    """Items of the events strictly before t, by time then log order (one user, one kind)."""
    hist = [int(items[k]) for k in sorted(np.flatnonzero(ts < t).tolist(), key=lambda k: (ts[k], k))]
    return hist[-max_history:] if max_history else hist


def heavy_user_log(n: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame({"user_id": np.full(n, 7, np.int64), "item_id": rng.integers(1, 500, n),
                         "timestamp": T0 + rng.integers(0, n // 2, n), "action": np.arange(n)})  # ties, no dups


def test_one_heavy_user_allocates_o_events_not_o_history_pairs():
    n = 4000
    log = heavy_user_log(n)
    tracemalloc.start()
    try:
        res = ingest_event_log(log)  # no max_history: the histories hold ~n^2/2 (request, event) pairs
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    hist = res.columns["seq_event_item_id"]
    assert isinstance(hist, HistorySlices)
    pairs = int(hist.lengths.sum())
    assert pairs > n * n // 3
    pair_bytes = pairs * 4 * 8  # four int64 history columns, as materialized before
    assert peak < pair_bytes / 50, f"peak {peak / 2**20:.1f} MiB vs {pair_bytes / 2**20:.0f} MiB of pairs"
    assert peak < 200 * n * 8, f"peak {peak / 2**20:.1f} MiB is not O(events)"
    ts = log["timestamp"].to_numpy()
    items = log["item_id"].to_numpy()
    raw_of = np.unique(items)  # dense id d is raw id raw_of[d - 1]
    for r in np.random.default_rng(1).choice(n, 40, replace=False):
        got = [int(raw_of[i - 1]) for i in hist.slice(r, r + 1).values]  # one row built, not all ~n^2/2 pairs
        assert got == brute_history(ts, items, int(res.columns["request_ts"][r]), None), r


def test_heavy_user_with_max_history_matches_eager_rows_and_brute_force():
    n = 1500
    log = heavy_user_log(n, seed=2)
    res = ingest_event_log(log, max_history=50)
    assert (res.columns["seq_event_ts"].lengths <= 50).all()
    ts, items = log["timestamp"].to_numpy(), log["item_id"].to_numpy()
    raw_of = np.unique(items)
    hist = res.columns["seq_event_item_id"].materialize()
    for r in range(0, n, 37):
        got = [int(raw_of[i - 1]) for i in hist.values[hist.offsets[r]:hist.offsets[r + 1]]]
        assert got == brute_history(ts, items, int(res.columns["request_ts"][r]), 50), r
    # the slices write the same Parquet rows as the eager columns (every row, one table)
    eager = attach_history(res_events(log), res.columns["user_id"], res.columns["request_ts"], ["event"],
                           max_history=50)
    table = to_arrow(res.columns, res.schema)
    ref = to_arrow({**res.columns, **eager}, res.schema)
    assert table.equals(ref)


def res_events(log: pl.DataFrame) -> pl.DataFrame:
    """The encoded events of a one-kind log whose raw ids are already dense-ordered integers."""
    items = log["item_id"].to_numpy()
    dense = np.searchsorted(np.unique(items), items) + 1
    return pl.DataFrame({"user_id": np.ones(len(log), np.int64), "item_id": dense, "category": np.zeros(len(log), np.int64),
                         "action": np.searchsorted(np.unique(log["action"].to_numpy()), log["action"].to_numpy()) + 1,
                         "kind": ["event"] * len(log), "timestamp": log["timestamp"].to_numpy(),
                         "event_idx": np.arange(len(log))})
