"""Raw <-> dense id maps (``recsys.data.id_maps``): built by ingest, written with the dataset, read back;
round trips for integer and string raw ids, unknown ids under both OOV policies, damaged map files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.data.config import IngestConfig, OovPolicy
from recsys.data.id_maps import IdMaps, with_raw_ids
from recsys.data.ingest import ingest, ingest_event_log
from recsys.data.prepare import write_dataset
from recsys.errors import InputError

T0 = 1_700_000_000


def events_of(users: list, items: list) -> pl.DataFrame:
    """One event per (user, item) pair, distinct times."""
    return pl.DataFrame({"user_id": users, "item_id": items, "timestamp": [T0 + 10 * k for k in range(len(users))]})


@pytest.mark.parametrize("raw_users,raw_items,dtype", [
    ([905, 12, 905, 40, 12], [7000, 3, 55, 3, 7000], pl.Int64),
    (["zoe", "amy", "zoe", "bob", "amy"], ["tt9", "tt10", "tt2", "tt10", "tt9"], pl.String),
])
def test_round_trip_through_the_written_maps(tmp_path: Path, raw_users, raw_items, dtype):
    items = pl.DataFrame({"item_id": raw_items[:1] + ["x" if dtype == pl.String else 1],
                          "category": ["a", "b"]})
    res = ingest_event_log(events_of(raw_users, raw_items), item_features=items)
    write_dataset(tmp_path / "ds", res.schema, res.columns, res.split, row_group_size=8, seed=0, id_maps=res.id_maps)
    maps = IdMaps.read(tmp_path / "ds")
    assert sorted(maps.tables) == ["categories", "items", "users"]  # no action column: no action map
    assert maps.raw_dtype("users") == dtype and maps.raw_dtype("items") == dtype
    # every request row maps back to the raw user of its event; dense -> raw -> dense is the identity
    dense_users = res.columns["user_id"]
    raw_back = maps.to_raw("users", dense_users)
    assert sorted(raw_back.to_list()) == sorted(raw_users)
    assert np.array_equal(maps.to_dense("users", raw_back).to_numpy(), dense_users)
    first_item = res.columns["cand_item_id"].values
    assert sorted(maps.to_raw("items", first_item).to_list()) == sorted(raw_items)
    # the item only in the item table has an id too, with its category
    only_in_table = maps.table("items").filter(pl.col("raw_id") == items["item_id"][1])
    assert only_in_table.height == 1 and only_in_table["category"][0] > 0
    cat_raw = maps.to_raw("categories", maps.table("items")["category"])
    assert cat_raw.drop_nulls().unique().sort().to_list() == ["a", "b"]


def test_unknown_ids_null_dense_zero_and_the_two_policies(tmp_path: Path):
    res = ingest_event_log(events_of([1, 2, 3], [10, 20, 10]))
    maps = res.id_maps
    assert maps.to_raw("users", np.array([0, 1, 3, 99])).to_list() == [None, 1, 3, None]
    assert maps.to_dense("items", pl.Series([20, 55, 10])).to_list() == [2, None, 1]
    # ids are normalized and cast like the log's: 20.0 is 20, the string "10" is 10
    assert maps.to_dense("items", pl.Series([20.0, 10.0])).to_list() == [2, 1]
    assert maps.to_dense("items", pl.Series(["10"])).to_list() == [1]
    dense, n_ids, n_rows = maps.lookup("items", pl.Series([55, 20, 55, 77]), OovPolicy.oov, "new.csv")
    assert dense.tolist() == [0, 2, 0, 0] and (n_ids, n_rows) == (2, 3)
    with pytest.raises(InputError, match=r"new.csv: 2 item id\(s\) in 3 row\(s\).*\[55, 77\].*data.oov_policy=oov"):
        maps.lookup("items", pl.Series([55, 20, 55, 77]), OovPolicy.error, "new.csv")
    with pytest.raises(InputError, match="does not convert"):
        maps.to_dense("items", pl.Series(["tt10"]), "new.csv")


def test_user_features_and_actions_are_mapped(tmp_path: Path):
    ev = events_of(["a", "b", "c", "c"], [1, 2, 1, 2]).with_columns(pl.Series("action", ["view", "buy", "buy", "view"]))
    users = pl.DataFrame({"user_id": ["a", "c"], "country": ["fr", "de"]})
    res = ingest_event_log(ev, user_features=users)
    maps = res.id_maps
    assert sorted(maps.tables) == ["actions", "feature_country", "items", "users"]
    country = maps.table("users").sort("raw_id")["country"].to_list()  # b is not in the user table: 0
    assert country[1] == 0 and country[0] > 0 and country[2] > 0
    assert maps.to_raw("feature_country", np.array(country)).to_list() == ["fr", None, "de"]
    # the one history event (c's first, a "buy") maps back to its raw action
    assert maps.to_raw("actions", res.columns["seq_event_action"].values).to_list() == ["buy"]


def test_damaged_map_file_is_refused_naming_it(tmp_path: Path):
    res = ingest_event_log(events_of([1, 2], [10, 20]))
    write_dataset(tmp_path / "ds", res.schema, res.columns, res.split, row_group_size=8, seed=0, id_maps=res.id_maps)
    target = tmp_path / "ds" / "id_maps" / "users.parquet"
    pl.DataFrame({"raw_id": [1, 2], "dense_id": [1, 1]}).write_parquet(target)
    with pytest.raises(InputError, match=r"users.parquet: damaged id map"):
        IdMaps.read(tmp_path / "ds")
    target.write_bytes(b"not parquet")
    with pytest.raises(InputError, match=r"users.parquet: not a readable id map"):
        IdMaps.read(tmp_path / "ds")
    assert IdMaps.read(tmp_path / "nowhere") is None  # a dataset without maps (synthetic): dense ids only


def test_output_columns_gain_raw_ids_next_to_the_dense_ones():
    maps = ingest_event_log(events_of(["zoe", "amy"], ["tt9", "tt10"])).id_maps
    cols = {"request_id": np.array([0, 1, 2]), "user_id": np.array([2, 1, 0]), "item_id": np.array([1, 2, 0]),
            "score_click": np.array([0.1, 0.2, 0.3], dtype=np.float32)}
    out = with_raw_ids(cols, maps)
    assert list(out) == ["request_id", "user_id", "raw_user_id", "item_id", "raw_item_id", "score_click"]
    assert out["raw_user_id"].to_pylist() == ["zoe", "amy", None]  # dense 0: unknown, no raw id
    assert out["raw_item_id"].to_pylist() == ["tt10", "tt9", None]
    assert with_raw_ids(cols, None) is cols  # synthetic data: dense ids are the only ids


def test_a_new_csv_of_digit_strings_matches_stored_string_ids(tmp_path: Path):
    # stored ids are strings ("007"); the new CSV's ids all look like numbers, so without reading them as
    # text CSV inference would make them 7 and 8 and every one would be unknown
    base = ingest_event_log(events_of(["007", "u1", "007"], ["08", "x", "x"]))
    write_dataset(tmp_path / "ds", base.schema, base.columns, base.split, row_group_size=8, seed=0,
                  id_maps=base.id_maps)
    new = tmp_path / "new.csv"
    new.write_text(f"user_id,item_id,timestamp\n007,08,{T0 + 100}\n007,08,{T0 + 200}\n")
    res = ingest(new, IngestConfig(), maps=IdMaps.read(tmp_path / "ds"))
    assert res.counters["unknown_items"] == 0 and res.counters["new_users"] == 0
    assert base.id_maps.to_raw("users", res.columns["user_id"]).to_list() == ["007", "007"]
