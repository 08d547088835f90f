"""The run-directory rules of ``recsys.train`` / ``recsys.score`` on the other entry points: ``python -m
recsys.evaluate | compare | quant | data``, each a real CLI process (``cli_runner``).

No data loss: an output directory that is, lies inside or contains one of the command's inputs (checkpoint,
train log, dataset, content file, raw files) is refused before anything is written, and the inputs' SHA-256
digests are the same after the command; Hydra writes nothing (no ``.hydra/``, no log file, no ``outputs/``).
One process per output directory: a directory another process holds is refused naming its pid. Clear errors:
a text file given as a checkpoint, and damaged Parquet files read by the evaluation / catalog / quantizer
readers, are ``InputError``s naming the file (and the row group).

The CLI runs are independent: one module fixture launches them three at a time (each spends most of its
~10 s importing torch) while another process holds one directory's lock; every test asserts on its own
result. Damaged-file and retention variants run in-process (no imports to pay).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile_helpers import ROOT, assert_refused, file_digests, flip_a_bit_in, hold_lock, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recsys.data import prepare_dataset
from recsys.data.item_categories import ItemCategories, collect_item_categories
from recsys.data.parquet_io import read_parquet_table
from recsys.data.schema import DataSchema
from recsys.data.validate import DataValidationError
from recsys.dist.checkpoint import DistCheckpointer
from recsys.dist.strategy import DIST_RESUME_KEYS
from recsys.errors import InputError
from recsys.evaluate.buckets import item_counts
from recsys.quant.content import read_content_parquet, write_content_parquet
from recsys.reliability.checkpoint import CheckpointManager, retention_doomed
from recsys.reliability.rundir import LOCK_NAME
from recsys.serving.catalog import catalog_items
from recsys.testing import torch_threads
from recsys.train.config import RunConfig, register_configs
from recsys.train.loop import open_run, train

register_configs()
CONFIGS = ROOT / "configs"
ML100K_FIXTURE = ROOT / "data" / "fixtures" / "ml-100k-mini"
EVENTLOG_FIXTURE = ROOT / "data" / "fixtures" / "eventlog-mini"
TRAIN = ["model=debug", "model.attention_backend=torch", "data=tiny", "train.progress=false",
         "data.loader.batch_size=16", "train.max_steps=2"]
HYDRA_LEFTOVERS = (".hydra", "outputs")  # what Hydra's default run dir would leave (plus <job>.log files)


def without_lock(digests: dict[str, str]) -> dict[str, str]:
    """Digests without lock files (each process that takes a lock writes its pid into it)."""
    return {k: v for k, v in digests.items() if Path(k).name != LOCK_NAME}


def train_config(w: dict[str, Path], out: Path, *extra: str) -> RunConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=[*TRAIN, f"data.root={w['data_root']}",
                                                               f"output_dir={out}", *extra]))


def hydra_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name in HYDRA_LEFTOVERS or p.suffix == ".log")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny dataset, one trained run (checkpoints/step_2.pt), a content Parquet, a copy of the ml-100k fixture
    as raw files, and a text file named like a checkpoint."""
    tmp = tmp_path_factory.mktemp("entry_points")
    w = {"tmp": tmp, "data_root": tmp / "data", "run": tmp / "run", "content": tmp / "content", "raw": tmp / "raw",
         "junk": tmp / "junk" / "step_5.pt"}
    cfg = train_config(w, w["run"])
    with torch_threads(1):
        train(cfg)
    w["dataset"] = prepare_dataset(cfg.data, progress=False).path
    w["content"].mkdir()
    gen = torch.Generator().manual_seed(0)
    write_content_parquet(w["content"] / "vecs.parquet", torch.arange(1, 41), torch.randn(40, 4, generator=gen))
    shutil.copytree(ML100K_FIXTURE, w["raw"] / "ml-100k")
    w["junk"].parent.mkdir()
    w["junk"].write_text("not a checkpoint\n")
    return w


def _commands(w: dict[str, Path]) -> dict[str, tuple[str, list[str]]]:
    """The independent CLI runs of this file: name -> (module, overrides)."""
    tmp, run = w["tmp"], w["run"]
    evaluate = [f"checkpoint={run}", "progress=false", "catalog.enabled=false"]
    quant = ["data=tiny", "progress=false"]
    return {
        "evaluate_into_run": ("recsys.evaluate", [*evaluate, f"output_dir={run}"]),
        "evaluate_locked": ("recsys.evaluate", [*evaluate, f"output_dir={tmp / 'eval-locked'}"]),
        "compare_into_data": ("recsys.compare", ["data=tiny", f"data.root={w['data_root']}", "models=[popularity]",
                                                 f"output_dir={w['data_root'] / 'compare'}", "train.progress=false"]),
        "quant_into_content": ("recsys.quant", [*quant, "content.source=parquet",
                                                f"content.path={w['content'] / 'vecs.parquet'}",
                                                f"output_dir={w['content']}"]),
        "quant_text_checkpoint": ("recsys.quant", [*quant, "content.source=checkpoint", f"content.path={w['junk']}",
                                                   f"output_dir={tmp / 'quant-junk'}"]),
        "data_into_raw": ("recsys.data", ["data=ml100k", f"data.root={w['raw']}", f"data.ml100k.raw_dir={w['raw']}",
                                          "data.ml100k.download=false", "loader_pass=false", "progress=false"]),
        "quant_ok": ("recsys.quant", [*quant, f"output_dir={tmp / 'quant-ok'}", "codebook_size=8", "levels=2"]),
        "data_ok": ("recsys.data", ["data=tiny", f"data.root={w['data_root']}", "loader_pass=false",
                                    "progress=false"]),
    }


@pytest.fixture(scope="module")
def cli(world) -> dict[str, subprocess.CompletedProcess | dict]:
    """Every command of :func:`_commands`, three at a time, while another process holds ``eval-locked``; the
    inputs' digests (and the repo root's Hydra leftovers) are taken before and returned with the results."""
    commands = _commands(world)
    before = {name: without_lock(file_digests(world[name])) for name in ("data_root", "run", "content", "raw")}
    before["root"] = hydra_leftovers(ROOT)
    with hold_lock(world["tmp"] / "eval-locked") as holder, ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(run_cli, module, *args) for name, (module, args) in commands.items()}
        results: dict = {name: f.result() for name, f in futures.items()}
    results["holder_pid"] = holder.pid
    results["before"] = before
    return results


# ------------------------------------------------------------------------------------- no data loss
def test_no_command_modified_its_inputs(world, cli):
    for name in ("data_root", "run", "content", "raw"):
        assert without_lock(file_digests(world[name])) == cli["before"][name], name


def test_evaluate_into_the_run_dir_is_refused(world, cli):
    run = world["run"]
    assert_refused(cli["evaluate_into_run"], f"output_dir={run} contains the input checkpoint=",
                   "step_2.pt", "never writes into its inputs")
    assert not (run / "metrics.json").exists() and hydra_leftovers(run) == []


def test_compare_inside_the_data_root_is_refused_before_training(world, cli):
    assert_refused(cli["compare_into_data"], f"output_dir={world['data_root'] / 'compare'} is inside the input "
                                             f"data.root={world['data_root']}")
    assert not (world["data_root"] / "compare").exists()


def test_quant_into_the_folder_of_its_content_file_is_refused(world, cli):
    assert_refused(cli["quant_into_content"], f"output_dir={world['content']} contains the input content.path=")
    assert sorted(p.name for p in world["content"].iterdir()) == ["vecs.parquet"]  # no sids.pt, .hydra/, log


def test_data_never_builds_a_dataset_inside_its_raw_dir(world, cli):
    raw = world["raw"]
    assert_refused(cli["data_into_raw"], "output dataset (data.root/<source>-<hash>)=", f"{raw}/ml100k-",
                   f"is inside the input data.ml100k.raw_dir={raw}")
    assert sorted(p.name for p in raw.iterdir()) == ["ml-100k"]


def test_no_dataset_is_built_into_the_folder_of_an_event_log(tmp_path):
    """In-process (the refusal is the same InputError the CLI turns into exit 2, test above): ``data.root`` = the
    log's folder would add ``eventlog-<hash>/`` and a temp folder beside the log. A ``data.root`` below it (the
    documented layout: ``ratings.csv`` beside ``data/``) is fine."""
    log = tmp_path / "log"
    shutil.copytree(EVENTLOG_FIXTURE, log)
    before = file_digests(log)

    def cfg(root: Path) -> object:
        return OmegaConf.merge(OmegaConf.load(CONFIGS / "data" / "eventlog.yaml"), {"root": str(root), "eventlog": {
            "events": str(log / "ratings.csv"), "item_features": str(log / "movies.csv"),
            "columns": {"user_id": "userId", "item_id": "movieId", "timestamp": "ts", "category": "genre"}}})

    with pytest.raises(InputError, match=re.escape(f"data.root={log} is the folder of the input "
                                                   f"data.eventlog.events={log / 'ratings.csv'}")):
        prepare_dataset(cfg(log), progress=False)
    assert file_digests(log) == before
    assert prepare_dataset(cfg(log / "data"), progress=False).path.parent == log / "data"
    assert {k: v for k, v in file_digests(log).items() if not k.startswith("data/")} == before


def test_hydra_writes_nothing_into_the_output_dir_or_the_working_dir(world, cli):
    for name in ("quant_ok", "data_ok"):
        assert cli[name].returncode == 0, cli[name].stderr[-3000:]
    assert sorted(p.name for p in (world["tmp"] / "quant-ok").iterdir()) == [
        LOCK_NAME, "report.json", "report.png", "sids.pt"]
    assert hydra_leftovers(ROOT) == cli["before"]["root"]  # Hydra's default run dir was ./outputs/<date>/<time>/


# ------------------------------------------------------------------------------ one process per directory
def test_evaluate_into_a_locked_dir_is_refused(world, cli):
    locked = world["tmp"] / "eval-locked"
    assert_refused(cli["evaluate_locked"], f"output_dir={locked} is in use by another process "
                                           f"(pid {cli['holder_pid']}")
    assert sorted(p.name for p in locked.iterdir()) == [LOCK_NAME]  # no metrics.json, no PNG


# ------------------------------------------------------------------------------------- clear errors
def test_quant_refuses_a_text_file_named_like_a_checkpoint(world, cli):
    assert_refused(cli["quant_text_checkpoint"], f"checkpoint {world['junk']} is not a readable torch checkpoint")
    assert not (world["tmp"] / "quant-junk").exists()


def test_damaged_parquet_files_are_named_by_every_reader(world, tmp_path):
    """Truncated: the file is named; a flipped bit in a data page: file and row group; a column the reader needs
    and the file lacks: named (pyarrow would leave it out silently)."""
    schema = DataSchema.from_json((world["dataset"] / "schema.json").read_text())
    src = world["dataset"] / "train" / "part-00000.parquet"
    truncated, flipped = tmp_path / "truncated.parquet", tmp_path / "flipped.parquet"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    shutil.copy(src, flipped)
    flip_a_bit_in(flipped, 1, "cand_item_id")
    content = tmp_path / "vecs.parquet"
    content.write_bytes((world["content"] / "vecs.parquet").read_bytes()[:-9])
    no_categories = ItemCategories(np.zeros(schema.num_items, dtype=np.int64), np.zeros(schema.num_items, bool), 0)
    readers = {
        "evaluate item_counts": lambda f: item_counts([f], schema.num_items),
        "catalog categories": lambda f: collect_item_categories([f], schema),
        "catalog items_file": lambda f: catalog_items(schema, str(f), no_categories),
        "quant content": read_content_parquet,
    }
    for read in readers.values():
        for f in (truncated, content):
            with pytest.raises(InputError, match=re.escape(f"{f}: not a readable Parquet file")):
                read(f)
    for name in ("evaluate item_counts", "catalog categories"):
        with pytest.raises(DataValidationError, match=re.escape(f"{flipped}, row group 1: cannot be read")):
            readers[name](flipped)
    with pytest.raises(DataValidationError, match=re.escape(f"{src}: no column(s) ['vector']")):
        read_parquet_table(src, ["cand_item_id", "vector"])
    assert read_parquet_table(src, ["cand_item_id"]).num_rows == read_parquet_table(src).num_rows > 0


# ------------------------------------------------------------------- recsys.dist's run-directory policy
def test_retention_rule_shared_by_both_trainers_keeps_the_newest_of_this_run():
    found = [(216, Path("step_216")), (3, Path("step_3")), (5, Path("step_5")), (1, Path("step_1"))]
    assert retention_doomed(found, 5, keep=1) == [Path("step_1"), Path("step_3")]  # never 5 (current) nor 216
    assert retention_doomed(found, 5, keep=2) == [Path("step_1")]
    assert retention_doomed(found, 1, keep=1) == []


def test_dist_resume_decision_is_single_process_trainings(world, tmp_path, capsys):
    """``open_run`` over recsys.dist's stores (rank 0 calls it): the model-only checkpoints/ count as the
    directory's checkpoints; a damaged trainer.pt is reported and skipped like a damaged step_<N>.pt."""
    run = tmp_path / "dist-run"
    shutil.copytree(world["run"] / "checkpoints", run / "checkpoints")  # checkpoints/step_2.pt
    dcp = DistCheckpointer(run / "dist_checkpoints")
    (run / "dist_checkpoints" / "step_4").mkdir(parents=True)
    for name in (".metadata", "trainer.pt"):
        (run / "dist_checkpoints" / "step_4" / name).write_text("damaged\n")
    others = [CheckpointManager(run / "checkpoints")]
    with pytest.raises(InputError, match=re.escape(f"(step_4 in {dcp.dir}; step_2.pt in {run / 'checkpoints'}) "
                                                   "and train.resume=false")):
        open_run(train_config(world, run, "train.resume=false"), run, dcp, DIST_RESUME_KEYS, others)
    with pytest.raises(InputError, match="holds checkpoints but none can be resumed"):
        open_run(train_config(world, run), run, dcp, DIST_RESUME_KEYS, others)
    assert f"skipping unusable {run / 'dist_checkpoints' / 'step_4'}: CheckpointError" in capsys.readouterr().out
    assert open_run(train_config(world, run, "train.fresh_run=true"), run, dcp, DIST_RESUME_KEYS, others) is None
    assert sorted(p.name for p in next(run.glob("previous-*")).iterdir()) == ["checkpoints", "dist_checkpoints"]
