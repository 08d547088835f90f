"""Fuzz: hostile event logs (ids of any dtype incl. unicode / huge / float / null, unsorted and duplicated
timestamps, null kinds, odd labels, item / user tables, exact duplicate rows) through ``ingest_event_log``:
either a ValueError that says what is wrong, or request rows that pass the read-time contract and whose every
history equals a brute force over the raw log (ids normalized and duplicates dropped by the documented
rules, re-implemented here)."""

from __future__ import annotations

import math
import re
import tempfile
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
from fuzz_helpers import FUZZ
from hypothesis import event, given
from hypothesis import strategies as st

from recsys.data.ingest import encode_event_log, ingest_event_log
from recsys.data.parquet_io import to_arrow
from recsys.data.validate import validate_table

TEXT = st.text(alphabet="aZé中🙂 _.\t0", min_size=0, max_size=3)


def id_values(kind: str, n: int, nulls: bool):
    """(strategy of n raw ids, polars dtype)."""
    base = {"int": (st.integers(-(2**63), 2**63 - 1), pl.Int64), "small": (st.integers(1, 4), pl.Int64),
            "str": (TEXT, pl.String), "float": (st.floats(allow_infinity=True, allow_nan=True), pl.Float64)}[kind]
    elem = st.one_of(base[0], st.none()) if nulls else base[0]
    return st.lists(elem, min_size=n, max_size=n), base[1]


@st.composite
def event_logs(draw) -> dict:
    n = draw(st.integers(0, 14))
    cols, dtypes = {}, {}
    for name in ("user_id", "item_id"):
        strat, dt = id_values(draw(st.sampled_from(["int", "small", "small", "str", "float"])), n,
                              draw(st.integers(0, 19)) == 0)
        cols[name], dtypes[name] = draw(strat), dt
    ts_kind = draw(st.sampled_from(["int"] * 5 + ["wide", "float", "str", "null", "datetime"]))
    if ts_kind == "int":
        cols["timestamp"], dtypes["timestamp"] = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n)), pl.Int64
    elif ts_kind == "wide":
        cols["timestamp"] = draw(st.lists(st.integers(-(2**62), 2**62), min_size=n, max_size=n))
        dtypes["timestamp"] = pl.Int64
    elif ts_kind == "float":
        cols["timestamp"] = draw(st.lists(st.one_of(st.integers(0, 6).map(float), st.floats()), min_size=n, max_size=n))
        dtypes["timestamp"] = pl.Float64
    elif ts_kind == "str":
        cols["timestamp"] = draw(st.lists(st.integers(0, 6).map(str), min_size=n, max_size=n))
        dtypes["timestamp"] = pl.String
    elif ts_kind == "datetime":
        cols["timestamp"] = [datetime(2024, 1, 1) + timedelta(seconds=x)
                             for x in draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))]
        dtypes["timestamp"] = pl.Datetime("us")
    else:
        cols["timestamp"] = draw(st.lists(st.one_of(st.none(), st.integers(0, 6)), min_size=n, max_size=n))
        dtypes["timestamp"] = pl.Int64
    if draw(st.booleans()):
        cols["kind"] = draw(st.lists(st.one_of(st.sampled_from(["click", "buy", "é 中"]), TEXT)
                                     if draw(st.integers(0, 4)) else st.one_of(TEXT, st.none()),
                                     min_size=n, max_size=n))
        dtypes["kind"] = pl.String
    if draw(st.booleans()):
        strat, dt = id_values(draw(st.sampled_from(["small", "str"])), n, draw(st.booleans()))
        cols["action"], dtypes["action"] = draw(strat), dt
    label = None
    if draw(st.booleans()):
        label = "y"
        bad = st.sampled_from([0.5, 5.0, float("nan"), None]) if draw(st.integers(0, 3)) == 0 else st.nothing()
        cols["y"] = draw(st.lists(st.one_of(st.sampled_from([0.0, 1.0, 1.0]), bad), min_size=n, max_size=n))
        dtypes["y"] = pl.Float64
    events = pl.DataFrame(cols, schema=dtypes)
    if n and draw(st.booleans()):  # exact duplicate rows
        events = pl.concat([events, events.gather(draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3)))])
    kinds = sorted({k for k in cols.get("kind", []) if k is not None}) or ["event"]
    item_features = None
    if draw(st.booleans()) and n:
        raw_items = [x for x in cols["item_id"] if x is not None]
        extra = draw(st.lists(st.sampled_from(raw_items) if raw_items else st.none(), max_size=4))
        item_features = pl.DataFrame({"item_id": extra + raw_items[:2],
                                      "category": draw(st.lists(st.one_of(TEXT, st.none()), min_size=len(extra) + len(raw_items[:2]),
                                                                max_size=len(extra) + len(raw_items[:2])))},
                                     schema={"item_id": dtypes["item_id"], "category": pl.String})
        if draw(st.integers(0, 3)) == 0:  # side table ids of another dtype than the log's
            item_features = item_features.with_columns(pl.col("item_id").cast(pl.String))
    user_features = None
    if draw(st.booleans()) and n:
        raw_users = list(dict.fromkeys(x for x in cols["user_id"] if x is not None))[:3]
        user_features = pl.DataFrame({"user_id": raw_users + raw_users[:1],
                                      "age": draw(st.lists(st.one_of(st.integers(0, 3), st.none()),
                                                           min_size=len(raw_users) + len(raw_users[:1]),
                                                           max_size=len(raw_users) + len(raw_users[:1])))},
                                     schema={"user_id": dtypes["user_id"], "age": pl.Int64})
        if draw(st.integers(0, 3)) == 0:
            user_features = user_features.with_columns(pl.col("user_id").cast(pl.String) + "x")
    return {"events": events, "item_features": item_features, "user_features": user_features,
            "label_column": label,
            "positive_threshold": draw(st.sampled_from([None, 1.0])) if label else None,
            "num_negatives": draw(st.integers(0, 2)),
            "target_kind": draw(st.sampled_from([None, None, kinds[0], kinds[-1], "missing kind"])),
            "split": draw(st.sampled_from(["leave_one_out", "time"] * 4 + ["random"])),
            "max_history": draw(st.sampled_from([None, 1, 3])), "seed": 0,
            "duplicates": draw(st.sampled_from(["drop", "keep"]))}


def expected_ids(values: list) -> list:
    """The id normalization rule, written out: a whole float is the int, ``"<int>.0..."`` loses the suffix."""
    out = []
    for x in values:
        if isinstance(x, float) and x == int(x):
            x = int(x)
        elif isinstance(x, str) and re.fullmatch(r"-?[0-9]+\.0+", x):
            x = x[:x.index(".")]
        out.append(x)
    return out


def expected_events(case: dict) -> pl.DataFrame:
    """The event log as ingest must see it: ids normalized, and (duplicates=drop) the first of equal rows."""
    events = case["events"]
    events = events.with_columns(
        *(pl.Series(c, expected_ids(events[c].to_list()), dtype=pl.Int64 if events[c].dtype.is_float()
                    else events[c].dtype) for c in ("user_id", "item_id")))
    if case["duplicates"] == "drop":
        events = events.unique(keep="first", maintain_order=True)
    if events["timestamp"].dtype == pl.String:  # numeric strings are read as numbers
        events = events.with_columns(pl.col("timestamp").cast(pl.Int64))
    return events


def brute_histories(log, user: int, ts: int, max_history: int | None) -> dict[str, list[tuple[int, int]]]:
    """Per kind: (item, ts) of the user's events strictly before ``ts``, by time then log order, last max_history."""
    out = {}
    for kind in log.kinds:
        rows = [(t, i, item) for u, item, t, k, i in zip(*(log.events[c].to_list() for c in
                ("user_id", "item_id", "timestamp", "kind", "event_idx"))) if u == user and k == kind and t < ts]
        hist = [(item, t) for t, _, item in sorted(rows)]
        out[kind] = hist[-max_history:] if max_history is not None else hist
    return out


@FUZZ
@given(event_logs())
def test_fuzz_ingest_clear_error_or_sound_rows(case):
    try:
        res = ingest_event_log(**case)
    except ValueError as e:
        assert len(str(e)) > 10, repr(e)  # a message, not a bare exception
        event(f"error: {str(e)[:40]}")
        return
    event("ingested")
    schema, cols = res.schema, res.columns
    table = to_arrow(cols, schema)
    validate_table(table, schema, "ingest", 0)  # the read-time contract holds
    events = expected_events(case)
    log = encode_event_log(events, item_features=case["item_features"])
    # every raw id decodes back through the vocabulary (no id silently merged or shifted)
    for raw, code, vocab in ((events["user_id"], log.events["user_id"], log.user_vocab),
                             (events["item_id"], log.events["item_id"], log.item_vocab)):
        decoded = [None if c == 0 else vocab[int(c) - 1] for c in code.to_list()]
        assert [str(x) for x in decoded] == [str(x) for x in raw.to_list()]
    if case["duplicates"] == "drop":
        assert res.counters["duplicate_events_dropped"] == len(case["events"]) - len(events)
    target = log.events if case["target_kind"] is None else log.events.filter(pl.col("kind") == case["target_kind"])
    assert table.num_rows == len(target)
    assert Counter(zip(table.column("user_id").to_pylist(), table.column("request_ts").to_pylist())) == \
        Counter(zip(target["user_id"].to_list(), target["timestamp"].to_list()))
    for r, (u, t) in enumerate(zip(table.column("user_id").to_pylist(), table.column("request_ts").to_pylist())):
        want = brute_histories(log, u, t, case["max_history"])
        got = {k: list(zip(table.column(schema.seq_col(k, "item_id"))[r].as_py(),
                           table.column(schema.seq_col(k, "ts"))[r].as_py())) for k in schema.sequences}
        assert got == want, (r, got, want)
    cand = table.column("cand_item_id").to_pylist()
    assert all(len(c) == 1 + case["num_negatives"] for c in cand)
    assert np.isin(res.split, [0, 1, 2]).all() and len(res.split) == table.num_rows
    assert all(math.isfinite(x) for x in table.column("request_ts").to_pylist())


@FUZZ
@given(st.binary(max_size=200) | st.text(alphabet="user_id,item_id,timestamp\t\n\"é1-.", max_size=200)
       .map(lambda t: ("user_id,item_id,timestamp\n" + t).encode()), st.sampled_from([".csv", ".tsv", ".parquet"]))
def test_fuzz_ingest_files_of_garbage(content, suffix):
    """Random bytes / ragged CSV as an event-log file: a clear ValueError (naming the file) or sound rows."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"events{suffix}"
        path.write_bytes(content)
        try:
            res = ingest_event_log(path)
        except ValueError as e:
            event(f"error: {re.sub(r'/[^ ]+', '<file>', str(e))[:40]}")
            assert len(str(e)) > 10
            return
        event("ingested")
        validate_table(to_arrow(res.columns, res.schema), res.schema, "ingest", 0)
