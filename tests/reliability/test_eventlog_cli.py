"""Your own event log end to end, as a user runs it: a MovieLens-style CSV with its own column names and
string ids is ingested by ``python -m recsys.data data=eventlog``, the debug model trains on it a few
steps (``python -m recsys.train data=eventlog``), ``python -m recsys.score`` scores its test split and then
a new log of the same catalog (``inputs_eventlog=``). Every output row carries raw ids that map back to
the input log with the labels it gave; no input file is modified. The subprocess runs are shared by the
assertions (one module-scoped fixture)."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pytest
from hostile_helpers import ROOT, assert_refused, file_digests, run_cli

FIXTURE = ROOT / "data" / "fixtures" / "eventlog-mini"
NEGATIVES = 2


def data_overrides(folder: Path) -> list[str]:
    return ["data=eventlog", f"data.root={folder / 'data'}", f"data.eventlog.events={folder / 'in' / 'ratings.csv'}",
            f"data.eventlog.item_features={folder / 'in' / 'movies.csv'}",
            f"data.eventlog.user_features={folder / 'in' / 'users.csv'}",
            "data.eventlog.columns.user_id=userId", "data.eventlog.columns.item_id=movieId",
            "data.eventlog.columns.timestamp=ts", "data.eventlog.columns.category=genre",
            "data.eventlog.label_column=rating", "data.eventlog.positive_threshold=4",
            f"data.eventlog.num_negatives={NEGATIVES}", "data.loader.batch_size=32"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("byod")
    shutil.copytree(FIXTURE, folder / "in")
    new = folder / "in" / "next_week.csv"  # a known user, a new user, and an item the catalog lacks
    new.write_text("userId,movieId,rating,ts\nuser_03,tt0001000,5,1700000000\nuser_03,tt9999999,2,1700000100\n"
                   "newcomer,tt0001037,4,1700000200\nnewcomer,tt0001074,1,1700000300\n")
    before = file_digests(folder / "in")
    data = data_overrides(folder)
    procs = {"data": run_cli("recsys.data", *data, "progress=false", "loader_pass=false"),
             "train": run_cli("recsys.train", *data, "model=debug", "train.max_steps=3", "train.progress=false",
                              f"output_dir={folder / 'run'}")}
    scores = {"score": (), "score_new": (f"inputs_eventlog={new}", "oov_policy=oov")}
    with ThreadPoolExecutor(3) as pool:  # the two scoring runs are independent: side by side
        futures = {name: pool.submit(run_cli, "recsys.score", f"checkpoint={folder / 'run'}",
                                     f"output_dir={folder / name}", "progress=false", *extra)
                   for name, extra in scores.items()}
        # meanwhile: a mapping onto a column the log lacks is refused before any work
        elsewhere = [o for o in data if not o.startswith("data.root=")] + [f"data.root={folder / 'refused'}"]
        wrong = pool.submit(run_cli, "recsys.data", *elsewhere, "data.eventlog.columns.item_id=itemId",
                            "progress=false")
        procs.update({name: f.result() for name, f in futures.items()})
    refused = wrong.result()
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}"
    return {"folder": folder, "before": before, "after": file_digests(folder / "in"), "new": new, "refused": refused}


def scored(folder: Path, name: str) -> tuple[pl.DataFrame, dict]:
    return (pl.read_parquet(sorted((folder / name).glob("part-*.parquet"))),
            json.loads((folder / name / "summary.json").read_text()))


def test_inputs_are_never_modified_and_a_wrong_mapping_is_refused(runs):
    assert runs["after"] == runs["before"]
    assert_refused(runs["refused"], "data.eventlog.columns.item_id=itemId", str(runs["folder"] / "in" / "ratings.csv"),
                   "'movieId'")
    assert not (runs["folder"] / "refused").exists()  # nothing was written


def test_every_scored_row_maps_back_to_the_input_log(runs):
    out, summary = scored(runs["folder"], "score")
    log = pl.read_csv(runs["folder"] / "in" / "ratings.csv", schema_overrides={"userId": pl.String,
                                                                                "movieId": pl.String})
    assert {"user_id", "raw_user_id", "item_id", "raw_item_id"} <= set(out.columns)
    assert out["raw_user_id"].null_count() == out["raw_item_id"].null_count() == 0
    assert summary["id_maps"] and summary["id_maps"].endswith("id_maps")
    # leave-one-out: the test split is every user's last event, plus NEGATIVES sampled items each
    assert out["raw_user_id"].n_unique() == log["userId"].n_unique()
    assert out.height == log["userId"].n_unique() * (1 + NEGATIVES)
    joined = out.join(log.rename({"userId": "raw_user_id", "movieId": "raw_item_id"}),
                      on=["raw_user_id", "raw_item_id"], how="left")
    events = joined.filter(pl.col("rating").is_not_null())
    assert events.height == log["userId"].n_unique()  # the (raw user, raw item) of each event exists in the log
    assert (events["label_click"] == (events["rating"] >= 4).cast(pl.Float32)).all()  # with its label
    negatives = joined.filter(pl.col("rating").is_null())  # never-interacted pairs: the sampled negatives
    assert negatives.height == NEGATIVES * events.height and (negatives["label_click"] == 0).all()
    # the last event of each user is the one scored (ties: log order)
    last = log.with_row_index("row").sort(["userId", "ts", "row"]).group_by("userId", maintain_order=True).last()
    assert sorted(zip(events["raw_user_id"], events["raw_item_id"])) == sorted(zip(last["userId"], last["movieId"]))


def test_a_new_log_is_scored_through_the_stored_maps(runs):
    out, summary = scored(runs["folder"], "score_new")
    ingest = summary["inputs_eventlog"]
    assert ingest["events"] == str(runs["new"])
    assert (ingest["new_users"], ingest["unknown_items"], ingest["unknown_item_rows"]) == (1, 1, 1)
    assert summary["requests"] == 4
    events = out.group_by("request_id", maintain_order=True).first()  # candidate 0: the event itself
    assert sorted(events["raw_user_id"].to_list()) == ["newcomer", "newcomer", "user_03", "user_03"]
    firsts = sorted(events["raw_item_id"].to_list(), key=str)
    assert firsts == [None, "tt0001000", "tt0001037", "tt0001074"]  # the unknown item is the OOV id 0
    assert out.filter(pl.col("raw_item_id").is_null())["item_id"].to_list() == [0]


def test_the_checkpoint_records_its_dataset_so_a_moved_log_still_scores(runs):
    from recsys.reliability.checkpoint import load_checkpoint
    from recsys.serving.job import resolve_checkpoint, trained_dataset

    state = load_checkpoint(resolve_checkpoint(runs["folder"] / "run"))
    built = sorted((d for d in (runs["folder"] / "data").iterdir() if d.name.startswith("eventlog-")),
                   key=lambda d: "id_maps_from" in json.loads((d / "summary.json").read_text()))
    assert len(built) == 2  # the log's dataset, then the new log's (encoded with the first one's maps)
    assert state["dataset_dir"] == str(built[0].resolve())
    _, summary = scored(runs["folder"], "score")
    assert summary["id_maps"] == str(built[0].resolve() / "id_maps")
    moved = json.loads(json.dumps(state["config"]))
    moved["data"]["eventlog"]["events"] = str(runs["folder"] / "gone.csv")  # the run's log, moved away
    ds = trained_dataset({**moved, "dataset_dir": state["dataset_dir"]})
    assert ds.path == built[0].resolve() and ds.summary["requests"] == 220
