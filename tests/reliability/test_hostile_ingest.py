"""Hostile event logs through ``ingest_event_log`` (real CSV / Parquet files under tmp_path) and through the
one ingest command there is, ``python -m recsys.data data=ml100k`` pointed at a hostile copy of the ml-100k
files: each mistake is either refused before any row is built (``InputError`` naming file, column, row and
value; exit 2 on the command line) or handled by a documented policy whose counter says what it did; no
input file is ever modified. Plus: one heavy user's ingest allocates O(events), not O(history pairs).

There is no command for an arbitrary CSV event log (``recsys.data`` ingests ml-100k's atomic files only), so
the CSV cases (quoting, string ids) run through the API; the command-line runs cover duplicates, ids read as
floats, timestamps in milliseconds and a non-numeric label in the ml-100k files; those three runs are
independent, so one module fixture launches them together and each test asserts on its own run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hostile_helpers import ROOT, assert_refused, file_digests, run_cli

from recsys.data.event_input import InputFileNotFound
from recsys.data.history import HistorySlices, attach_history
from recsys.data.ingest import SPLIT_CODES, ingest_event_log
from recsys.data.parquet_io import to_arrow
from recsys.errors import InputError

T0 = 1_700_000_000  # a plausible epoch second
FIXTURE = ROOT / "data" / "fixtures" / "ml-100k-mini"


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def base_rows() -> list[tuple[int, int, int]]:
    """(user, item, seconds) of a small clean log: 3 users, 4 events each, distinct times."""
    return [(u, (u * 5 + k) % 7 + 1, T0 + 10 * u + k) for u in (1, 2, 3) for k in range(4)]


def csv_of(rows, scale: int = 1) -> list[str]:
    return [f"{u},{i},{t * scale}" for u, i, t in rows]


def history_lists(res, kind: str = "event") -> list[list[int]]:
    col = res.columns[f"seq_{kind}_item_id"]
    return [list(col.values[col.offsets[r]:col.offsets[r + 1]]) for r in range(col.num_rows)]


def assert_refuses(call, *needles: str) -> str:
    """``call()`` raises an ``InputError`` whose message names every needle; returns the message."""
    with pytest.raises(InputError) as info:
        call()
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"message does not name {needle!r}: {msg}"
    return msg


@pytest.fixture
def inputs(tmp_path: Path):
    """The input folder and a dict; once ``freeze`` recorded the digests, teardown checks no file changed."""
    folder = tmp_path / "in"
    folder.mkdir()
    state: dict[str, dict[str, str]] = {}
    yield folder, state
    assert "digests" in state, "the test never recorded its inputs"
    assert file_digests(folder) == state["digests"], "an input file was modified"


def freeze(folder: Path, state: dict) -> None:
    """Record the digests of every input file (call once all inputs are written)."""
    state["digests"] = file_digests(folder)


# ---------------------------------------------------------------------------------------------- duplicates


def test_exact_duplicates_dropped_by_default_kept_or_refused_on_request(inputs):
    folder, before = inputs
    rows = csv_of(base_rows())
    path = write_csv(folder / "dup.csv", "user_id,item_id,timestamp", rows + [rows[3], rows[3], rows[7]])
    clean = write_csv(folder / "clean.csv", "user_id,item_id,timestamp", rows)
    freeze(folder, before)
    res, ref = ingest_event_log(path), ingest_event_log(clean)
    assert res.counters["duplicate_events_dropped"] == 3 and ref.counters["duplicate_events_dropped"] == 0
    assert to_arrow(res.columns, res.schema).equals(to_arrow(ref.columns, ref.schema))
    np.testing.assert_array_equal(res.split, ref.split)
    # the bug: user 1's last event twice became one valid and one test row with the same candidate
    kept = ingest_event_log(path, duplicates="keep")
    assert kept.counters["duplicate_events_dropped"] == 0 and len(kept.split) == len(rows) + 3
    user1 = kept.columns["user_id"] == 1
    cands = kept.columns["cand_item_id"].values[user1]
    assert cands[kept.split[user1] == SPLIT_CODES["valid"]].tolist() == cands[kept.split[user1] ==
                                                                             SPLIT_CODES["test"]].tolist()
    assert_refuses(lambda: ingest_event_log(path, duplicates="error"), str(path), "row 12 repeats row 3",
                   "3 exact duplicate event(s)", "duplicates=drop")


def test_rows_differing_in_any_column_are_not_duplicates(inputs):
    folder, before = inputs
    path = write_csv(folder / "e.csv", "user_id,item_id,timestamp,kind,y",
                     [f"1,2,{T0},a,1", f"1,2,{T0},b,1", f"1,2,{T0},a,0", f"1,2,{T0 + 1},a,1", f"1,2,{T0},a,1"])
    freeze(folder, before)
    res = ingest_event_log(path, label_column="y")
    assert res.counters["duplicate_events_dropped"] == 1 and len(res.split) == 4


# ---------------------------------------------------------------------------------------------- timestamps


@pytest.mark.parametrize("unit,scale", [("ms", 10**3), ("us", 10**6), ("ns", 10**9)])
def test_sub_second_units_auto_detected_or_given_and_equal_to_seconds(inputs, unit, scale):
    folder, before = inputs
    secs = write_csv(folder / "s.csv", "user_id,item_id,timestamp", csv_of(base_rows()))
    sub = folder / f"{unit}.parquet"
    rows = base_rows()
    pl.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                  "timestamp": [r[2] * scale + scale - 1 for r in rows]}).write_parquet(sub)  # floored to the second
    freeze(folder, before)
    ref = ingest_event_log(secs)
    for given in ("auto", unit):
        res = ingest_event_log(sub, timestamp_unit=given)
        assert res.counters["timestamp_unit"] == unit
        assert to_arrow(res.columns, res.schema).equals(to_arrow(ref.columns, ref.schema))
    assert ref.counters["timestamp_unit"] == "s"


def test_milliseconds_read_as_seconds_are_refused(inputs):
    folder, before = inputs
    path = write_csv(folder / "ms.csv", "user_id,item_id,timestamp", csv_of(base_rows(), 1000))
    freeze(folder, before)
    assert_refuses(lambda: ingest_event_log(path, timestamp_unit="s"), str(path), "column 'timestamp'", "row 0",
                   f"{base_rows()[0][2] * 1000}", "not a plausible event time in seconds", "milliseconds")


@pytest.mark.parametrize("values,needles", [
    ([T0, T0 * 1000], ["mixes magnitudes", "row 0", "row 1", "seconds", "milliseconds"]),
    ([T0, 5_000_000_000], ["row 1", "5000000000", "not a plausible event time in seconds"]),   # year 2128
    ([T0, -5], ["row 1", "-5", "1970-01-01..2100-01-01"]),
    ([T0, "2024-01-01"], ["row 1", "'2024-01-01'", "not a number"]),
    ([float(T0), T0 + 0.5], ["row 1", "not a whole number"]),
])
def test_implausible_or_mixed_timestamps_are_refused(inputs, values, needles):
    folder, before = inputs
    path = write_csv(folder / "t.csv", "user_id,item_id,timestamp", [f"1,{k + 1},{v}" for k, v in enumerate(values)])
    freeze(folder, before)
    assert_refuses(lambda: ingest_event_log(path), str(path), "column 'timestamp'", *needles)


# ---------------------------------------------------------------------------------------------- ids


def test_float_printed_ids_are_one_item(inputs):
    folder, before = inputs
    # the item column holds a non-number, so it is read as strings: "9" and "9.0" used to be two items
    path = write_csv(folder / "ids.csv", "user_id,item_id,timestamp",
                     [f"1,9,{T0}", f"1,9.0,{T0 + 1}", f"1,x,{T0 + 2}", f"2,9,{T0 + 3}", f"2.0,x,{T0 + 4}"])
    items = write_csv(folder / "items.csv", "item_id,category", ["9.0,toys", "x,food"])
    floats = folder / "floats.parquet"
    pl.DataFrame({"user_id": [1.0, 1.0, 2.0], "item_id": [9.0, 9.0, 4.0],
                  "timestamp": [T0, T0 + 1, T0 + 2]}).write_parquet(floats)
    freeze(folder, before)
    res = ingest_event_log(path, item_features=items)
    assert res.schema.num_items == 3 and res.schema.num_categories == 3  # ids 1, 2 (+ 0 unknown)
    assert res.counters["item_ids_normalized"] == 1
    assert res.counters["user_ids_normalized"] == 5  # "2.0" made the user column floats: all read back as ints
    cand = res.columns["cand_item_id"].values
    assert len(set(cand[res.columns["user_id"] == 1][:2].tolist())) == 1
    assert (res.columns["cand_category"].values > 0).all()  # "9.0" in the item table found item "9"
    res = ingest_event_log(floats)
    assert res.schema.num_items == 3 and res.counters["item_ids_normalized"] == 3
    assert res.counters["user_ids_normalized"] == 3


def test_fractional_or_non_finite_float_ids_are_refused(inputs):
    folder, before = inputs
    path = folder / "frac.parquet"
    pl.DataFrame({"user_id": [1, 1], "item_id": [9.0, 9.5], "timestamp": [T0, T0 + 1]}).write_parquet(path)
    nan = folder / "nan.parquet"
    pl.DataFrame({"user_id": [1.0, float("nan")], "item_id": [1, 2], "timestamp": [T0, T0 + 1]}).write_parquet(nan)
    freeze(folder, before)
    assert_refuses(lambda: ingest_event_log(path), str(path), "column 'item_id'", "row 1", "9.5", "not an id")
    assert_refuses(lambda: ingest_event_log(nan), str(nan), "column 'user_id'", "row 1", "nan")


# ---------------------------------------------------------------------------------------------- CSV quoting


def test_standard_quoted_csv_is_read_like_the_plain_one(inputs):
    folder, before = inputs
    plain = write_csv(folder / "plain.csv", "user_id,item_id,timestamp,kind",
                      [f"{u},{i},{t},{'a b' if k % 2 else 'c'}" for k, (u, i, t) in enumerate(base_rows())])
    quoted = write_csv(folder / "quoted.csv", '"user_id","item_id","timestamp","kind"',
                       [f'"{u}","{i}","{t}","{"a b" if k % 2 else "c"}"' for k, (u, i, t) in enumerate(base_rows())])
    comma = write_csv(folder / "comma.csv", "user_id,item_id,timestamp,kind",
                      [f'{u},"it,{i}",{t},"say ""hi"""' for u, i, t in base_rows()])
    freeze(folder, before)
    ref, res = ingest_event_log(plain), ingest_event_log(quoted)
    assert res.schema.sequences == ["c", "a b"]
    assert to_arrow(res.columns, res.schema).equals(to_arrow(ref.columns, ref.schema))
    res = ingest_event_log(comma)  # a separator and doubled quotes inside quotes
    assert res.schema.sequences == ['say "hi"'] and res.schema.num_items == ref.schema.num_items


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("option,value,needle", [
    ("num_negatives", -1, "ingest.num_negatives must be an integer >= 0, got -1"),
    ("max_history", -3, "ingest.max_history must be None (keep all) or an integer >= 1, got -3"),
    ("max_history", 0, "got 0"),
    ("valid_fraction", 1.5, "ingest.valid_fraction must be a number in [0, 1), got 1.5"),
    ("split", "random", "ingest.split must be one of leave_one_out, time; got 'random'"),
    ("duplicates", "ignore", "ingest.duplicates must be one of drop, keep, error; got 'ignore'"),
    ("timestamp_unit", "minutes", "ingest.timestamp_unit must be one of s, ms, us, ns, auto; got 'minutes'"),
    ("positive_threshold", float("nan"), "ingest.positive_threshold"),
])
def test_bad_options_are_refused_before_any_file_is_read(tmp_path, option, value, needle):
    missing = tmp_path / "not-there.csv"  # an option error comes first: nothing is read
    assert_refuses(lambda: ingest_event_log(missing, **{option: value}), needle)


def test_split_fractions_summing_over_one_are_refused(tmp_path):
    assert_refuses(lambda: ingest_event_log(tmp_path / "x.csv", split="time", valid_fraction=0.6, test_fraction=0.5),
                   "ingest.valid_fraction + ingest.test_fraction must be < 1", "0.6 + 0.5 = 1.1")


# ---------------------------------------------------------------------------------------------- labels


def test_labels_yes_no_refused_true_false_read_as_one_zero(inputs):
    folder, before = inputs
    rows = base_rows()
    yes = write_csv(folder / "yes.csv", "user_id,item_id,timestamp,clicked",
                    [f"{u},{i},{t},{'yes' if k % 3 else 'no'}" for k, (u, i, t) in enumerate(rows)])
    tf = write_csv(folder / "tf.csv", "user_id,item_id,timestamp,clicked",
                   [f"{u},{i},{t},{'true' if k % 3 else 'false'}" for k, (u, i, t) in enumerate(rows)])
    half = write_csv(folder / "half.csv", "user_id,item_id,timestamp,clicked",
                     [f"{u},{i},{t},{0.5 if k == 5 else 1}" for k, (u, i, t) in enumerate(rows)])
    gap = write_csv(folder / "gap.csv", "user_id,item_id,timestamp,clicked",
                    [f"{u},{i},{t},{'' if k == 7 else 1}" for k, (u, i, t) in enumerate(rows)])
    dup_then_gap = write_csv(folder / "dupgap.csv", "user_id,item_id,timestamp,clicked",
                             [f"{rows[0][0]},{rows[0][1]},{rows[0][2]},1"] + gap.read_text().splitlines()[1:])
    freeze(folder, before)
    # rows are named as in the file, also after a duplicate before them was dropped
    assert_refuses(lambda: ingest_event_log(dup_then_gap, label_column="clicked"), "first at row 8")
    assert_refuses(lambda: ingest_event_log(yes, label_column="clicked"), str(yes), "column 'clicked'", "row 0",
                   "'no' is not a number")
    res = ingest_event_log(tf, label_column="clicked")
    labels = res.columns["cand_label_click"].values
    assert sorted(labels.tolist()) == sorted(float(k % 3 != 0) for k in range(len(rows)))
    assert_refuses(lambda: ingest_event_log(half, label_column="clicked"), str(half), "label column 'clicked'",
                   "row 5", "0.5", "is not 0/1")
    assert ingest_event_log(half, label_column="clicked", positive_threshold=1.0).columns[
        "cand_label_click"].values.sum() == len(rows) - 1
    assert_refuses(lambda: ingest_event_log(gap, label_column="clicked"), str(gap), "1 missing value(s)",
                   "first at row 7")
    assert_refuses(lambda: ingest_event_log(gap, label_column="liked"), str(gap), "no label column 'liked'")


# ---------------------------------------------------------------------------------------------- other refusals


def test_every_other_bad_input_is_an_input_error_naming_it(inputs):
    folder, before = inputs
    good = write_csv(folder / "good.csv", "user_id,item_id,timestamp", csv_of(base_rows()))
    nocol = write_csv(folder / "nocol.csv", "user_id,item,timestamp", csv_of(base_rows()))
    nulls = write_csv(folder / "nulls.csv", "user_id,item_id,timestamp", csv_of(base_rows()) + [f",3,{T0}"])
    empty = write_csv(folder / "empty.csv", "user_id,item_id,timestamp", [])
    ragged = write_csv(folder / "ragged.csv", "user_id,item_id,timestamp", ["1,2", "1,2,3,4,5"])
    bad_items = write_csv(folder / "items.csv", "item_id,genre", ["1,x"])
    bad_users = write_csv(folder / "users.csv", "uid,age", ["1,3"])
    saturated = write_csv(folder / "all_items.csv", "user_id,item_id,timestamp", [f"1,{i},{T0 + i}" for i in (1, 2, 3)])
    freeze(folder, before)
    assert_refuses(lambda: ingest_event_log(nocol), str(nocol), "lacks column(s) ['item_id']")
    assert_refuses(lambda: ingest_event_log(nulls), str(nulls), "column 'user_id' has 1 null value(s)", "row 12")
    assert_refuses(lambda: ingest_event_log(empty), str(empty), "has no rows")
    assert_refuses(lambda: ingest_event_log(ragged), str(ragged), "cannot read")
    assert_refuses(lambda: ingest_event_log(good, target_kind="buy"), "no event of kind 'buy'", str(good))
    assert_refuses(lambda: ingest_event_log(good, cold_items=[99]), "cold_items", "[99]")
    assert_refuses(lambda: ingest_event_log(good, item_features=bad_items), str(bad_items), "item_id, category")
    assert_refuses(lambda: ingest_event_log(good, user_features=bad_users), str(bad_users), "user_id")
    assert_refuses(lambda: ingest_event_log(saturated, num_negatives=2), "could not sample negatives",
                   "num_negatives=2")
    with pytest.raises(InputFileNotFound) as info:
        ingest_event_log(folder / "absent.csv")
    assert isinstance(info.value, FileNotFoundError) and "absent.csv" in str(info.value)


# ---------------------------------------------------------------------------------------------- memory


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


# ---------------------------------------------------------------------------------------------- the command


def hostile_ml100k(tmp_path: Path, edit) -> Path:
    """A copy of the ml-100k fixture with ``edit(lines of ml-100k.inter)`` applied; returns the raw dir."""
    raw = tmp_path / "raw"
    shutil.copytree(FIXTURE, raw / "ml-100k")
    inter = raw / "ml-100k" / "ml-100k.inter"
    lines = inter.read_text().splitlines()
    inter.write_text("\n".join(edit(lines)) + "\n")
    return raw


def prepare_cli(tmp_path: Path, raw: Path):
    return run_cli("recsys.data", "data=ml100k", f"data.root={tmp_path / 'data'}", f"data.ml100k.raw_dir={raw}",
                   "data.ml100k.download=false", "loader_pass=false", "progress=false",
                   f"hydra.run.dir={tmp_path / 'hydra'}")


def _duplicates_and_float_ids(lines: list[str]) -> list[str]:
    user, item, rating, ts = lines[1].split("\t")
    return [lines[0], f"{user}\t{item}.0\t{rating}\t{ts}", *lines[2:], lines[5], lines[9]]


HOSTILE = {
    "milliseconds": (lambda lines: [lines[0]] + ["\t".join(ln.split("\t")[:3] + [ln.split("\t")[3] + "000"])
                                                 for ln in lines[1:]],
                     ["'timestamp'", "row 0", "880000400000", "not a plausible event time in seconds", "milliseconds"]),
    "label-yes": (lambda lines: lines[:4] + ["\t".join(lines[4].split("\t")[:2] + ["yes"] + lines[4].split("\t")[3:])]
                  + lines[5:], ["'rating'", "row 3", "'yes' is not a number"]),
}
"""Refused ml-100k edits: name -> (edit of the lines of ml-100k.inter, needles of the error)."""


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, dict[str, str],
                                                                       subprocess.CompletedProcess]]:
    """The command on the accepted copy (``ok``) and on each of :data:`HOSTILE`, together:
    name -> (work dir, raw dir, raw digests before, result)."""
    edits = {"ok": _duplicates_and_float_ids, **{name: edit for name, (edit, _) in HOSTILE.items()}}
    work = {name: tmp_path_factory.mktemp(f"ml100k-{name}") for name in edits}
    raw = {name: hostile_ml100k(work[name], edit) for name, edit in edits.items()}
    before = {name: file_digests(raw[name]) for name in edits}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(prepare_cli, work[name], raw[name]) for name in edits}
        return {name: (work[name], raw[name], before[name], f.result()) for name, f in futures.items()}


def test_cli_drops_duplicate_ratings_and_merges_float_printed_ids(cli):
    tmp_path, raw, before, proc = cli["ok"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert file_digests(raw) == before
    summary = json.loads(next((tmp_path / "data").glob("ml100k-*/summary.json")).read_text())
    assert summary["duplicate_events_dropped"] == 2 and summary["requests"] == 35
    assert summary["item_ids_normalized"] == 37  # "5.0" made the column floats: all 37 values read back as ints
    assert summary["num_items_table"] == 13 and summary["timestamp_unit"] == "s"  # as the clean fixture


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_cli_refuses_hostile_ml100k_files_with_exit_2(cli, name):
    tmp_path, raw, before, proc = cli[name]
    assert_refused(proc, "ml-100k.inter", *HOSTILE[name][1])
    assert file_digests(raw) == before
    data = tmp_path / "data"
    assert not data.exists() or not any(data.iterdir()), "a refused run left a dataset behind"
