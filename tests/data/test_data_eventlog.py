"""``data.source=eventlog`` through the API (the command line runs are in tests/reliability/test_eventlog_cli.py):
the committed MovieLens-style fixture with its own column names and string ids is prepared and cached by
content; mistakes are refused naming the key and the value before any work; a new log of the same
catalog is encoded with the stored id maps."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from data_helpers import EVENTLOG_FIXTURE, load_data_config

from recsys.data import eventlog
from recsys.data.config import DataConfig
from recsys.data.id_maps import IdMaps
from recsys.data.prepare import prepare_dataset
from recsys.errors import InputError
from recsys.reliability import digest

MAPPING = {"eventlog.columns.user_id": "userId", "eventlog.columns.item_id": "movieId",
           "eventlog.columns.timestamp": "ts", "eventlog.columns.category": "genre",
           "eventlog.label_column": "rating", "eventlog.positive_threshold": 4.0, "eventlog.num_negatives": 2}


def config(root: Path, events: Path, **more: object) -> DataConfig:
    return load_data_config("eventlog", root=str(root), **{"eventlog.events": str(events), **MAPPING, **more})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("evl")
    cfg = config(root / "data", EVENTLOG_FIXTURE / "ratings.csv",
                 **{"eventlog.item_features": str(EVENTLOG_FIXTURE / "movies.csv"),
                    "eventlog.user_features": str(EVENTLOG_FIXTURE / "users.csv")})
    return root, prepare_dataset(cfg, progress=False, need=("train", "valid", "test"))


def test_fixture_prepares_with_its_own_column_names_and_string_ids(prepared):
    _, ds = prepared
    raw = pl.read_csv(EVENTLOG_FIXTURE / "ratings.csv")
    assert ds.path.name.startswith("eventlog-") and ds.summary["requests"] == raw.height
    assert [f.name for f in ds.schema.sparse] == ["country"]
    maps = IdMaps.read(ds.path)
    assert sorted(maps.tables) == ["categories", "feature_country", "items", "users"]
    assert maps.raw_dtype("users") == pl.String and maps.size("users") == raw["userId"].n_unique()
    key = ds.summary["config"]["eventlog"]
    assert key["files"]["events"]["sha256"] == eventlog.file_sha256(EVENTLOG_FIXTURE / "ratings.csv")
    assert "path" not in json.dumps(key["files"])  # content, not location, identifies the inputs


def test_cache_key_follows_content_not_path(tmp_path: Path):
    copy = tmp_path / "copy.csv"
    shutil.copy(EVENTLOG_FIXTURE / "ratings.csv", copy)
    root = tmp_path / "data"
    first = prepare_dataset(config(root, EVENTLOG_FIXTURE / "ratings.csv"), progress=False)
    same = prepare_dataset(config(root, copy), progress=False)  # same bytes elsewhere: reused
    assert same.path == first.path and same.cached
    with open(copy, "a") as f:  # one more event: ingested again, the original dataset left alone
        f.write("user_00,tt0001000,5,1660000000\n")
    changed = prepare_dataset(config(root, copy), progress=False)
    assert changed.path != first.path and not changed.cached
    assert changed.summary["requests"] == first.summary["requests"] + 1


@pytest.mark.parametrize("more,needles", [
    ({"eventlog.events": "/no/such/log.csv"}, ["data.eventlog.events=/no/such/log.csv does not exist"]),
    ({"eventlog.item_features": "/no/items.csv"}, ["data.eventlog.item_features=/no/items.csv does not exist"]),
    ({"eventlog.events": None}, ["data.source=eventlog needs data.eventlog.events="]),
    ({"eventlog.num_negatives": -1}, ["data.eventlog.num_negatives must be an integer >= 0, got -1"]),
    ({"source": "synthetic"}, ["data.eventlog.events=", "data.source=synthetic does not read it"]),
    ({"eventlog.id_maps_from": "/tmp"}, ["data.eventlog.id_maps_from=/tmp is not a prepared eventlog dataset"]),
])
def test_config_mistakes_are_refused_naming_key_and_value(tmp_path: Path, more, needles):
    with pytest.raises(InputError) as info:
        config(tmp_path, EVENTLOG_FIXTURE / "ratings.csv", **more)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_unknown_column_is_refused_before_the_files_are_hashed(tmp_path: Path):
    log = tmp_path / "log.csv"
    shutil.copy(EVENTLOG_FIXTURE / "ratings.csv", log)
    cfg = config(tmp_path / "data", log, **{"eventlog.columns.item_id": "itemId"})
    with pytest.raises(InputError) as info:
        prepare_dataset(cfg, progress=False)
    assert "data.eventlog.columns.item_id=itemId" in str(info.value) and str(log) in str(info.value)
    assert "'movieId'" in str(info.value)  # the file's own columns are listed
    assert not any(k[0] == str(log.resolve()) for k in digest._FILE_DIGESTS)  # refused before any hashing
    cfg = config(tmp_path / "data", log, **{"eventlog.label_column": "stars"})
    with pytest.raises(InputError, match="no label column 'stars'"):
        prepare_dataset(cfg, progress=False)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_new_log_through_the_stored_maps(prepared, tmp_path: Path):
    _, base = prepared
    maps = IdMaps.read(base.path)
    new = tmp_path / "new.csv"
    new.write_text("userId,movieId,rating,ts\n"
                   "user_03,tt0001000,5,1700000000\nuser_03,tt9999999,2,1700000100\n"
                   "newcomer,tt0001037,4,1700000200\n")
    common = {"eventlog.id_maps_from": str(base.path)}
    with pytest.raises(InputError, match=r"1 item id\(s\) in 1 row\(s\).*tt9999999"):
        prepare_dataset(config(tmp_path / "data", new, **common), progress=False, need=("test",))
    ds = prepare_dataset(config(tmp_path / "data", new, oov_policy="oov", **common), progress=False, need=("test",))
    assert ds.schema == dataclasses.replace(base.schema, oov_policy="oov")  # same id space: the base dataset's checkpoints score these rows
    s = ds.summary
    assert (s["new_users"], s["unknown_items"], s["unknown_item_rows"]) == (1, 1, 1)
    assert s["splits"]["test"]["requests"] == 3  # rows for a trained model to score: all in test
    assert s["splits"]["train"]["requests"] == s["splits"]["valid"]["requests"] == 0
    rows = pl.read_parquet(ds.splits["test"])
    new_maps = IdMaps.read(ds.path)
    raw_users = new_maps.to_raw("users", rows["user_id"].to_numpy()).to_list()
    assert sorted(raw_users) == ["newcomer", "user_03", "user_03"]
    first = np.array([c[0] for c in rows["cand_item_id"].to_list()])
    assert sorted(new_maps.to_raw("items", first).to_list(), key=str) == [None, "tt0001000", "tt0001037"]
    known = maps.to_dense("users", pl.Series(["user_03"])).to_list()
    assert new_maps.to_dense("users", pl.Series(["user_03", "newcomer"])).to_list() == [
        known[0], maps.size("users") + 1]  # stored ids kept, the new user appended
    assert rows["country"].to_list().count(0) == 1  # the new user has no stored feature value
    # what recsys.score inputs_eventlog= derives from the trained config: the same dataset
    trained = config(tmp_path / "data", EVENTLOG_FIXTURE / "ratings.csv",
                     **{"eventlog.item_features": str(EVENTLOG_FIXTURE / "movies.csv")})
    derived = eventlog.new_log_config(trained, base.path, new, "oov")
    assert prepare_dataset(derived, progress=False, need=("test",)).path == ds.path
    with pytest.raises(InputError, match="trained on data.source=synthetic"):
        eventlog.new_log_config(load_data_config("tiny"), base.path, new)
    with pytest.raises(InputError, match="takes categories and user features from the stored id maps"):
        config(tmp_path / "data", new, **common, **{"eventlog.item_features": str(EVENTLOG_FIXTURE / "movies.csv")})


def test_a_mapping_onto_a_column_the_file_already_has_is_refused(tmp_path: Path):
    log = tmp_path / "log.csv"
    log.write_text("userId,user_id,movieId,ts\nu1,7,m1,1700000000\n")
    with pytest.raises(InputError, match=r"data.eventlog.columns.user_id=userId, but the table also has a column "
                                         r"'user_id'"):
        prepare_dataset(config(tmp_path / "data", log, **{"eventlog.label_column": None}), progress=False)
