"""Loader side of long histories: ``long_max_len`` attaches a jagged long history; the window is unchanged."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from recsys.data.collate import LONG_KEYS, collate
from recsys.data.config import LoaderConfig
from recsys.testing import tiny_schema

SCHEMA = tiny_schema(kinds=("click", "like"))


def table(histories: list[dict[str, int]], seed: int = 0) -> pa.Table:
    """One row per entry: ``{kind: n_events}`` random events (increasing timestamps)."""
    rng = np.random.default_rng(seed)
    data: dict[str, list] = {"request_id": list(range(len(histories))), "user_id": list(range(len(histories))),
                             "request_ts": [10**9] * len(histories)}
    for f in SCHEMA.sparse:
        data[f.name] = [1] * len(histories)
    for d in SCHEMA.dense:
        data[d] = [0.0] * len(histories)
    for k in SCHEMA.sequences:
        for fld, hi in (("item_id", SCHEMA.num_items), ("category", SCHEMA.num_categories),
                        ("action", SCHEMA.num_actions)):
            data[SCHEMA.seq_col(k, fld)] = [rng.integers(1, hi, h.get(k, 0)).tolist() for h in histories]
        data[SCHEMA.seq_col(k, "ts")] = [np.sort(rng.integers(0, 10**8, h.get(k, 0))).tolist() for h in histories]
    data["cand_item_id"] = [[1, 2]] * len(histories)
    data["cand_category"] = [[1, 1]] * len(histories)
    for t in SCHEMA.tasks:
        data[f"cand_label_{t}"] = [[0.0, 1.0]] * len(histories)
    return pa.Table.from_pydict(data, schema=SCHEMA.arrow_schema())


@pytest.mark.parametrize("max_len,long_max_len", [(3, 3), (3, 10), (2, 1000)])
def test_long_history_is_the_last_long_max_len_per_kind_with_window_flags(max_len, long_max_len):
    hist = [{"click": 0, "like": 0}, {"click": 1}, {"click": 7, "like": 4}, {"click": 30, "like": 12}]
    t = table(hist)
    short = collate(t, SCHEMA, max_len)
    batch = collate(t, SCHEMA, max_len, long_max_len)
    assert short.long_seq is None
    for key in short.seq.keys():  # the S-token window is exactly what it was without the long history
        np.testing.assert_array_equal(short.seq[key].values().numpy(), batch.seq[key].values().numpy())
    long = {k: batch.long_seq[k] for k in LONG_KEYS}
    offs = np.concatenate([[0], np.cumsum(long["ts"].lengths().numpy())])
    for b, h in enumerate(hist):
        row = {k: long[k].values().numpy()[offs[b]:offs[b + 1]] for k in LONG_KEYS}
        expect = {k: [] for k in LONG_KEYS}
        for ki, kind in enumerate(SCHEMA.sequences):
            n = h.get(kind, 0)
            keep = min(n, long_max_len)
            for fld in ("item_id", "category", "action", "ts"):
                expect[fld] += t.column(SCHEMA.seq_col(kind, fld))[b].as_py()[n - keep:]
            expect["kind"] += [ki] * keep
            expect["in_window"] += [int(i >= keep - max_len) for i in range(keep)]
        for k in LONG_KEYS:
            assert row[k].tolist() == expect[k], (b, k)


def test_100k_event_history_stays_jagged():
    """One 100k-event user among short ones: arrays as long as the events, no B x L padding."""
    hist = [{"click": 100_000, "like": 5}, {"click": 2}, {}]
    t = table(hist)
    batch = collate(t, SCHEMA, 64, 200_000)
    assert batch.long_seq["item_id"].values().numel() == 100_000 + 5 + 2
    assert batch.long_seq["in_window"].values().sum() == 64 + 5 + 2
    assert batch.seq["click.item_id"].values().numel() == 64 + 2


def test_loader_config_checks_long_max_len():
    LoaderConfig(max_len=8, long_max_len=0)
    LoaderConfig(max_len=8, long_max_len=8)
    with pytest.raises(ValueError, match="long_max_len"):
        LoaderConfig(max_len=8, long_max_len=4)
    with pytest.raises(ValueError, match="long_max_len"):
        collate(table([{"click": 3}]), SCHEMA, 8, 4)
