"""Event-log ingest: no leakage, the ml-100k split protocol, negatives."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from data_helpers import ML100K_FIXTURE, ML100K_REAL, load_data_config
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.data.history import HistorySlices, unique_values
from recsys.data.ingest import (
    SPLIT_CODES,
    attach_history,
    ingest_event_log,
    leave_one_out_split,
    sample_negatives,
)
from recsys.data.ml100k import held_out_items, ingest_ml100k, read_atomic
from recsys.data.prepare import config_hash, config_key
from recsys.data.schema import DataSchema


def brute_history(events: list[tuple[int, int, int, int]], user: int, ts: int) -> list[tuple[int, int]]:
    """(item, ts) of the user's events strictly before ts, by time then log order."""
    rows = [(t, i, item) for i, (u, item, t, _) in enumerate(events) if u == user and t < ts]
    return [(item, t) for t, _, item in sorted(rows)]


def assert_no_leakage(cols, schema: DataSchema) -> None:
    req_ts = cols["request_ts"]
    for kind in schema.sequences:
        ts = cols[schema.seq_col(kind, "ts")]
        assert np.all(ts.values < np.repeat(req_ts, ts.lengths)), kind
        inside = np.diff(ts.values) >= 0
        boundary = np.isin(np.arange(1, len(ts.values)), ts.offsets)
        assert np.all(inside | boundary), f"{kind}: history not time-sorted"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(0, 6)), min_size=0, max_size=40),
       st.lists(st.tuples(st.integers(1, 4), st.integers(0, 7)), min_size=1, max_size=10),
       st.sampled_from([None, 2]))
def test_attach_history_matches_brute_force(raw_events, requests, max_history):
    """Ties in time everywhere: equal timestamps are never history; order is time then log order."""
    events = [(u, item, t, 0) for u, item, t in raw_events]
    df = pl.DataFrame({"user_id": [e[0] for e in events], "item_id": [e[1] for e in events],
                       "timestamp": [e[2] for e in events], "kind": ["k"] * len(events),
                       "category": [1] * len(events), "action": [1] * len(events)},
                      schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64, "kind": pl.String,
                              "category": pl.Int64, "action": pl.Int64})
    users = np.array([r[0] for r in requests])
    ts = np.array([r[1] for r in requests])
    cols = attach_history(df, users, ts, ["k"], max_history=max_history)
    items, times = cols["seq_k_item_id"], cols["seq_k_ts"]
    for r, (u, t) in enumerate(requests):
        want = brute_history(events, u, t)
        if max_history is not None:
            want = want[len(want) - max_history:] if len(want) > max_history else want
        got = list(zip(items.values[items.offsets[r]:items.offsets[r + 1]].tolist(),
                       times.values[times.offsets[r]:times.offsets[r + 1]].tolist()))
        assert got == want
    # the slices ingest keeps (HistorySlices) hold the same rows, and take / tail / slice agree with Jagged's
    lazy = attach_history(df, users, ts, ["k"], max_history=max_history, lazy=True)
    rows = np.arange(len(requests))[::-1].repeat(2)
    for name, eager in cols.items():
        sl = lazy[name]
        assert isinstance(sl, HistorySlices)
        for a, b in ((sl, eager), (sl.take(rows), eager.take(rows)), (sl.tail(1), eager.tail(1)),
                     (sl.slice(1, len(requests)), eager.slice(1, len(requests)))):
            np.testing.assert_array_equal(a.values, b.values)
            np.testing.assert_array_equal(a.offsets, b.offsets)
        np.testing.assert_array_equal(unique_values(sl), np.unique(eager.values))


def test_no_leakage_synthetic(tiny_prepared):
    for files in tiny_prepared.splits.values():
        for f in files:
            t = pq.read_table(f)
            for kind in tiny_prepared.schema.sequences:
                for req_ts, hist in zip(t["request_ts"].to_pylist(), t[f"seq_{kind}_ts"].to_pylist()):
                    assert all(h < req_ts for h in hist)
                    assert hist == sorted(hist)


def _fixture_rows():
    inter = read_atomic(ML100K_FIXTURE / "ml-100k.inter")
    return [(int(u), int(i), int(t), float(r)) for u, i, r, t in
            zip(inter["user_id"], inter["item_id"], inter["rating"], inter["timestamp"])]


def test_no_leakage_and_exact_history_ml100k_fixture():
    res = ingest_ml100k(ML100K_FIXTURE)
    assert_no_leakage(res.columns, res.schema)
    events = [(u, i, t, r) for u, i, t, r in _fixture_rows()]
    cols = res.columns
    items, ts, actions = cols["seq_rating_item_id"], cols["seq_rating_ts"], cols["seq_rating_action"]
    assert res.columns["request_id"].size == len(events)
    for r in range(len(cols["request_id"])):
        want = brute_history(events, int(cols["user_id"][r]), int(cols["request_ts"][r]))
        got = list(zip(items.values[items.offsets[r]:items.offsets[r + 1]].tolist(),
                       ts.values[ts.offsets[r]:ts.offsets[r + 1]].tolist()))
        assert got == want
    # action = the rating, like = rating >= 4
    rating_of = {(u, i): rt for u, i, _, rt in events}
    for r in range(len(cols["request_id"])):
        u = int(cols["user_id"][r])
        for item, a in zip(items.values[items.offsets[r]:items.offsets[r + 1]],
                           actions.values[actions.offsets[r]:actions.offsets[r + 1]]):
            assert rating_of[(u, int(item))] == a
        cand = int(cols["cand_item_id"].values[r])
        assert cols["cand_label_like"].values[r] == float(rating_of[(u, cand)] >= 4)


def test_split_protocol_ml100k_fixture():
    """Per user by time, ties by file order: last -> test, second-to-last -> valid."""
    res = ingest_ml100k(ML100K_FIXTURE)
    events = _fixture_rows()
    by_user: dict[int, list[tuple[int, int, int]]] = {}
    for pos, (u, i, t, _) in enumerate(events):
        by_user.setdefault(u, []).append((t, pos, i))
    cols = res.columns
    got = {}
    for r in range(len(cols["request_id"])):
        got.setdefault(int(cols["user_id"][r]), {}).setdefault(int(res.split[r]), []).append(
            int(cols["cand_item_id"].values[r]))
    for u, evs in by_user.items():
        order = [i for _, _, i in sorted(evs)]
        assert got[u][SPLIT_CODES["test"]] == [order[-1]]
        assert got[u][SPLIT_CODES["valid"]] == [order[-2]]
        assert sorted(got[u][SPLIT_CODES["train"]]) == sorted(order[:-2])
    # user 1's last two ratings share a second: the later one in the file is the test row
    assert got[1][SPLIT_CODES["test"]] == [7] and got[1][SPLIT_CODES["valid"]] == [6]


def test_leave_one_out_tie_break_is_row_order():
    codes = leave_one_out_split(np.array([1, 1, 1, 2]), np.array([5, 5, 5, 1]))
    assert codes.tolist() == [0, 1, 2, 2]


def test_negatives_avoid_interacted_items():
    users = np.array([1, 1, 2])
    seen_u = np.array([1, 1, 1, 2])
    seen_i = np.array([1, 2, 3, 4])
    negs = sample_negatives(users, 50, 8, seen_u, seen_i, seed=3)
    assert negs.shape == (3, 50)
    assert not np.isin(negs[:2], [1, 2, 3]).any() and not np.isin(negs[2], [4]).any()
    assert ((negs >= 1) & (negs < 8)).all()
    np.testing.assert_array_equal(negs, sample_negatives(users, 50, 8, seen_u, seen_i, seed=3))


def test_generic_event_log_with_negatives(tmp_path):
    """CSV with string ids, kinds and a label; negatives get label 0; ids become dense 1..n."""
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,timestamp,kind,clicked\n"
                    "a,x,10,view,1\na,y,20,view,0\na,z,30,cart,1\nb,x,15,view,1\nb,w,40,view,1\n")
    items = tmp_path / "items.csv"
    items.write_text("item_id,category\nx,toys\ny,books\nz,toys\nw,food\nv,food\n")
    res = ingest_event_log(path, item_features=items, task="click", label_column="clicked", num_negatives=2,
                           split="time", valid_fraction=0.2, test_fraction=0.2)
    s = res.schema
    assert s.sequences == ["view", "cart"] and s.num_items == 6 and s.num_categories == 4
    cand = res.columns["cand_item_id"]
    labels = res.columns["cand_label_click"].values.reshape(-1, 3)
    assert (cand.lengths == 3).all() and (labels[:, 1:] == 0).all()
    assert sorted(labels[:, 0].tolist()) == [0, 1, 1, 1, 1]
    assert_no_leakage(res.columns, s)


@pytest.mark.skipif(not (ML100K_REAL / "ml-100k.inter").is_file(),
                    reason="ml-100k not downloaded (run: bash scripts/get_ml100k.sh, or python -m recsys.data data=ml100k)")
def test_real_ml100k_protocol_and_no_leakage():
    res = ingest_ml100k(ML100K_REAL)
    assert_no_leakage(res.columns, res.schema)
    assert len(res.split) == 100_000
    assert (res.split == SPLIT_CODES["test"]).sum() == 943 and (res.split == SPLIT_CODES["valid"]).sum() == 943
    assert res.schema.num_items == 1683 and res.schema.num_actions == 6
    assert np.unique(res.columns["user_id"]).size == 943


def test_cold_item_holdout_ml100k_fixture():
    """Held-out movies: in no history and no train/valid row; each of their ratings is a test row whose
    history is the user's warm ratings strictly before it; leave-one-out over the warm ratings only."""
    res = ingest_ml100k(ML100K_FIXTURE, cold_item_fraction=0.25, cold_seed=1)
    events = _fixture_rows()
    raw_items = sorted({i for _, i, _, _ in events})
    cold_raw = {i for i in raw_items if i in set(held_out_items(pl.DataFrame({"item_id": raw_items}), 0.25, 1))}
    assert len(cold_raw) == round(0.25 * len(raw_items)) > 0
    warm_events = [e for e in events if e[1] not in cold_raw]
    cols = res.columns
    assert cols["request_id"].size == len(events)  # every rating is still a request
    assert_no_leakage(cols, res.schema)
    items, ts = cols["seq_rating_item_id"], cols["seq_rating_ts"]
    # the fixture's raw ids are 1..n and dense ids keep the sorted raw order
    assert res.cold_items.tolist() == sorted(cold_raw)
    got: dict[int, dict[int, list[int]]] = {}
    for r in range(len(cols["request_id"])):
        u, cand = int(cols["user_id"][r]), int(cols["cand_item_id"].values[r])
        want = brute_history(warm_events, u, int(cols["request_ts"][r]))
        assert list(zip(items.values[items.offsets[r]:items.offsets[r + 1]].tolist(),
                        ts.values[ts.offsets[r]:ts.offsets[r + 1]].tolist())) == want
        if cand in cold_raw:
            assert res.split[r] == SPLIT_CODES["test"]
        else:
            got.setdefault(u, {}).setdefault(int(res.split[r]), []).append(cand)
    for u in {e[0] for e in warm_events}:
        order = [i for t, _, i in sorted((t, pos, i) for pos, (uu, i, t, _) in enumerate(warm_events) if uu == u)]
        assert got[u][SPLIT_CODES["test"]] == [order[-1]]
        if len(order) > 1:
            assert got[u][SPLIT_CODES["valid"]] == [order[-2]]
        assert sorted(got[u].get(SPLIT_CODES["train"], [])) == sorted(order[:-2])
    plain = ingest_ml100k(ML100K_FIXTURE)
    assert plain.cold_items is None


def test_cold_items_never_drawn_as_negatives_and_unknown_ids_rejected(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,timestamp\n" + "".join(
        f"u{u},i{(u * 7 + k) % 12},{100 * u + k}\n" for u in range(6) for k in range(5)))
    res = ingest_event_log(path, num_negatives=4, cold_items=["i3", "i8"])
    cand = res.columns["cand_item_id"]
    rows = np.repeat(np.arange(len(res.split)), cand.lengths)
    is_cold = np.isin(cand.values, res.cold_items)
    assert res.cold_items.size == 2
    assert (res.split[rows[is_cold]] == SPLIT_CODES["test"]).all()
    negatives = cand.values.reshape(-1, 5)[:, 1:]
    assert not np.isin(negatives, res.cold_items).any()
    assert not np.isin(res.columns["seq_event_item_id"].values, res.cold_items).any()
    with pytest.raises(ValueError, match=r"cold_items: 1 id\(s\) not in the event log.*nope"):
        ingest_event_log(path, cold_items=["i3", "nope"])
    negs = sample_negatives(np.array([1, 2]), 30, 8, np.array([1]), np.array([2]), seed=0,
                            excluded_items=np.array([5, 6]))
    assert not np.isin(negs, [5, 6]).any() and not np.isin(negs[0], [2]).any()


def test_ml100k_cold_option_keeps_the_default_cache_key():
    base = load_data_config("ml100k")
    assert set(config_key(base)["ml100k"]) == {"recbole_version", "like_threshold"}
    on = load_data_config("ml100k", **{"ml100k.cold_item_fraction": 0.1})
    assert config_key(on)["ml100k"]["cold_item_fraction"] == 0.1 and config_hash(on) != config_hash(base)
    with pytest.raises(ValueError, match="ml100k.cold_item_fraction"):
        load_data_config("ml100k", **{"ml100k.cold_item_fraction": 1.0})
