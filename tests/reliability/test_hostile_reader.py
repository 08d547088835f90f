"""Hostile input to the dataset reader and the quantizer, where an operator would meet it: a path the source
ignores or that does not exist, an empty split, a float64 dense part file, truncated / 0-byte / corrupted part
files, a garbage or mis-structured schema.json, a codebook larger than the catalog.

Every refusal is checked the way the user sees it (``python -m recsys.train|data|quant`` as a real process (``cli_runner``):
exit 2, one ``error:`` line naming the culprit, no traceback) or through the API where a subprocess adds
nothing; every damaged dataset is a copy of one prepared ``data=tiny`` dataset, and its files are shown to be
byte-identical after the command (SHA-256 before / after). The CLI runs are independent: one module fixture
damages their copies and launches them three at a time (each spends most of its time importing torch), and
every test asserts on its own run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hostile_helpers import ROOT, assert_refused, chunk_bytes, file_digests, flip_a_bit_in, run_cli
from omegaconf import OmegaConf

from recsys.data.config import DataConfig, DataSource, LoaderConfig
from recsys.data.loader import RequestLoader
from recsys.data.parquet_io import SPLITS, open_parquet, read_row_group, read_schema
from recsys.data.prepare import PreparedDataset, prepare_dataset
from recsys.data.validate import DataValidationError, validate_table
from recsys.errors import InputError
from recsys.quant.config import ContentConfig
from recsys.quant.rq_kmeans import RQKMeans
from recsys.quant.run import auto_codebook_size

TRAIN = ["model=debug", "model.attention_backend=torch", "data=tiny", "train.progress=false", "train.max_steps=2"]
DATA = ["data=tiny", "progress=false"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    """The ``data=tiny`` dataset, prepared once; tests damage copies of it, never this one."""
    root = tmp_path_factory.mktemp("hostile_reader") / "data"
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "configs" / "data" / "tiny.yaml"), {"root": str(root)})
    return prepare_dataset(cfg, progress=False)


def copy_of(tiny: PreparedDataset, tmp_path: Path) -> Path:
    dst = tmp_path / "dataset"
    shutil.copytree(tiny.path, dst)
    return dst


def float64_parts(tiny: PreparedDataset) -> tuple[pa.Table, pa.Table, pa.Table, np.ndarray, str]:
    """(whole train file, its first 100 rows, the rest with dense column ``name`` as float64, those float64
    values, name): 100 % batch_size 16 != 0, so a batch spans both part files."""
    whole = pq.read_table(tiny.splits["train"][0])
    first, rest = whole.slice(0, 100), whole.slice(100)
    name = tiny.schema.dense[0]
    wide = rest.column(name).cast(pa.float64()).to_numpy() + 1e-9  # not representable in float32
    rest = rest.set_column(rest.column_names.index(name), name, pa.array(wide, pa.float64()))
    return whole, first, rest, wide, name


@dataclass
class CliRun:
    proc: subprocess.CompletedProcess
    seconds: float
    """Wall time of the command."""
    work: Path
    """The case's own directory (output dirs, Hydra run dir)."""
    dataset: Path | None = None
    """The damaged copy of the tiny dataset the command read."""
    before: dict[str, str] | None = None
    """``file_digests(dataset)`` before the command."""


def _damaged(tiny: PreparedDataset, work: Path, damage: Callable[[Path], None]) -> Path:
    ds = copy_of(tiny, work)
    damage(ds)
    return ds


def _cases(tiny: PreparedDataset, tmp: Path) -> dict[str, tuple[str, list[str], Path | None, dict]]:
    """The CLI runs of this file: name -> (module, overrides, dataset copy or None, run_cli keywords)."""
    for name in ("path_ignored", "no_train_files", "float64", "truncated", "corrupted", "garbage_schema", "quant"):
        (tmp / name).mkdir()

    def float64(ds: Path) -> None:
        _, first, rest, _, _ = float64_parts(tiny)
        pq.write_table(first, ds / "train" / "part-00000.parquet", row_group_size=32)
        pq.write_table(rest, ds / "train" / "part-00001.parquet", row_group_size=32)

    def truncated(ds: Path) -> None:
        f = ds / "train" / "part-00000.parquet"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    damaged = {
        "no_train_files": lambda ds: shutil.rmtree(ds / "train"),
        "float64": float64,
        "truncated": truncated,
        "corrupted": lambda ds: flip_a_bit_in(ds / "train" / "part-00000.parquet", 1, "cand_item_id"),
        "garbage_schema": lambda ds: (ds / "schema.json").write_bytes(b'{"sparse": [\x00\xff'),
    }
    ds = {name: _damaged(tiny, tmp / name, damage) for name, damage in damaged.items()}

    def data(name: str, *extra: str) -> tuple[str, list[str], Path, dict]:
        return "recsys.data", [*DATA, *parquet_args(ds[name]), *extra, f"hydra.run.dir={tmp / name / 'hydra'}"], \
            ds[name], {}

    w = tmp / "path_ignored"
    return {
        "path_ignored": ("recsys.train", [*TRAIN, "data.path=/nonexistent", f"data.root={w / 'data'}",
                                          f"output_dir={w / 'run'}"], None, {}),
        "no_train_files": ("recsys.train", [*TRAIN, *parquet_args(ds["no_train_files"]),
                                            f"output_dir={tmp / 'no_train_files' / 'run'}"], ds["no_train_files"], {}),
        "float64": data("float64"),
        "truncated": data("truncated"),
        "corrupted": data("corrupted", "data.loader.num_workers=1"),
        "garbage_schema": data("garbage_schema"),
        "quant": ("recsys.quant", ["data=tiny", "codebook_size=1000000", f"output_dir={tmp / 'quant' / 'q'}"], None,
                  {"timeout": 120}),
    }


def _timed(module: str, args: list[str], kwargs: dict) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = run_cli(module, *args, **kwargs)
    return proc, time.monotonic() - t0


@pytest.fixture(scope="module")
def cli(tiny: PreparedDataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, CliRun]:
    """Every command of :func:`_cases` on its damaged copy, three at a time; digests taken before."""
    tmp = tmp_path_factory.mktemp("hostile_reader_cli")
    cases = _cases(tiny, tmp)
    before = {name: file_digests(ds) for name, (_, _, ds, _) in cases.items() if ds is not None}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_timed, module, args, kw) for name, (module, args, _, kw) in cases.items()}
        done = {name: f.result() for name, f in futures.items()}
    return {name: CliRun(*done[name], tmp / name, ds, before.get(name)) for name, (_, _, ds, _) in cases.items()}


def parquet_args(path: Path) -> list[str]:
    return ["data.source=parquet", f"data.path={path}"]


def parquet_cfg(path: Path) -> DataConfig:
    return DataConfig(source=DataSource.parquet, path=str(path))


# ---------------------------------------------------------------------------------- paths and empty splits
def test_train_refuses_a_path_the_source_ignores(cli: dict[str, CliRun]) -> None:
    """`data.path=/nonexistent` with the default synthetic source trained on synthetic data and exited 0."""
    run = cli["path_ignored"]
    assert_refused(run.proc, "data.path=/nonexistent", "data.source=synthetic")
    assert not (run.work / "run" / "report.json").exists() and not (run.work / "data").exists()  # before any work


def test_a_path_must_exist_and_be_read(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"data.path=\S*missing does not exist"):
        parquet_cfg(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match=r"data.path=\S*file is not a directory"):
        parquet_cfg(tmp_path / "file")
    with pytest.raises(InputError, match="data.source=ml100k does not read it"):
        DataConfig(source=DataSource.ml100k, path=str(tmp_path))
    with pytest.raises(InputError, match="content.source=synthetic does not read it"):
        ContentConfig(path=str(tmp_path / "file"))
    with pytest.raises(InputError, match=r"content.path=\S*nope.parquet is not a file"):
        ContentConfig(source="parquet", path=str(tmp_path / "nope.parquet"))


def test_train_refuses_a_dataset_without_train_files(cli: dict[str, CliRun]) -> None:
    run = cli["no_train_files"]
    assert not (run.dataset / "train").exists()
    assert_refused(run.proc, f"dataset {run.dataset}: split 'train' is empty", "no ")
    assert file_digests(run.dataset) == run.before
    assert not (run.work / "run" / "report.json").exists()


def test_empty_splits_refused_where_needed(tiny: PreparedDataset, tmp_path: Path) -> None:
    """0 train rows (an ingest that kept none) is refused on open; an empty valid split only where it is
    read (training validates on it)."""
    ds = copy_of(tiny, tmp_path)
    for split in ("train", "valid"):
        f = ds / split / "part-00000.parquet"
        pq.write_table(pq.read_table(f).slice(0, 0), f)
    (ds / "train" / "part-00001.parquet").write_bytes((ds / "train" / "part-00000.parquet").read_bytes())
    with pytest.raises(InputError, match=re.escape(f"dataset {ds}: split 'train' is empty: its 2 Parquet file(s) hold 0")):
        prepare_dataset(parquet_cfg(ds), progress=False)
    shutil.copy(tiny.splits["train"][0], ds / "train" / "part-00001.parquet")
    assert prepare_dataset(parquet_cfg(ds), progress=False).splits["valid"]  # valid not needed here
    with pytest.raises(InputError, match=re.escape(f"dataset {ds}: split 'valid' is empty")):
        prepare_dataset(parquet_cfg(ds), progress=False, need=SPLITS)


# ---------------------------------------------------------------------------------------------- float64
def test_float64_dense_part_file_is_accepted_and_cast(tiny: PreparedDataset, cli: dict[str, CliRun]) -> None:
    """One part file with a float64 dense column (documented as accepted) crashed the loader's concat of
    row groups from different files; it now reads, every value equal to its float32 cast."""
    run, ds = cli["float64"], cli["float64"].dataset
    whole, first, _, wide, name = float64_parts(tiny)
    assert pq.read_schema(ds / "train" / "part-00001.parquet").field(name).type == pa.float64()
    proc = run.proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"loader   {whole.num_rows} requests" in proc.stdout
    assert file_digests(ds) == run.before

    files = sorted((ds / "train").glob("*.parquet"))
    batches = list(RequestLoader(files, tiny.schema, LoaderConfig(batch_size=16)))
    got = torch.cat([b.dense[:, 0] for b in batches]).numpy()
    ids = torch.cat([b.request_id for b in batches]).numpy()
    want = np.concatenate([first.column(name).to_numpy(), wide.astype(np.float32)])
    assert np.array_equal(ids, whole.column("request_id").to_numpy())
    assert got.dtype == np.float32 and np.array_equal(got, want)


def test_float64_beyond_float32_range_is_refused(tiny: PreparedDataset) -> None:
    table = pq.ParquetFile(tiny.splits["train"][0]).read_row_group(0)
    name = tiny.schema.dense[0]
    vals = table.column(name).cast(pa.float64()).to_numpy().copy()
    vals[3] = 1e300
    table = table.set_column(table.column_names.index(name), name, pa.array(vals))
    with pytest.raises(DataValidationError, match=rf"f.parquet, row group 0, column '{name}', row 3: dense value "
                                                  r"1e\+300 is beyond the float32 range"):
        validate_table(table, tiny.schema, "f.parquet", 0)


# ------------------------------------------------------------------------------------- damaged part files
def test_truncated_part_file_is_named(tiny: PreparedDataset, cli: dict[str, CliRun]) -> None:
    run = cli["truncated"]
    f = run.dataset / "train" / "part-00000.parquet"
    assert f.stat().st_size == tiny.splits["train"][0].stat().st_size // 2
    assert_refused(run.proc, f"{f}: not a readable Parquet file", "truncated")
    assert file_digests(run.dataset) == run.before


def test_zero_byte_part_file_is_named(tiny: PreparedDataset, tmp_path: Path) -> None:
    ds = copy_of(tiny, tmp_path)
    f = ds / "train" / "part-00000.parquet"
    f.write_bytes(b"")
    with pytest.raises(DataValidationError, match=re.escape(f"{f}: not a readable Parquet file (Parquet file size is 0")):
        prepare_dataset(parquet_cfg(ds), progress=False)
    with pytest.raises(DataValidationError, match=re.escape(f"{f}: not a readable Parquet file")):
        RequestLoader([f], tiny.schema, LoaderConfig())
    assert f.stat().st_size == 0


@pytest.mark.parametrize("checksums", [True, False])
def test_no_bit_flip_in_a_page_decodes_to_wrong_values(tiny: PreparedDataset, tmp_path: Path,
                                                       checksums: bool) -> None:
    """Every single-bit flip across one column chunk of a file the writer made: an error or the same rows,
    never wrong rows. The same file written without page checksums (the control) decodes many flips
    silently into wrong values, which is what the checksums are for."""
    src = tiny.splits["train"][0]  # written by write_requests, with page checksums
    if not checksums:
        src = tmp_path / "no_checksums.parquet"
        pq.write_table(pq.read_table(tiny.splits["train"][0]), src, row_group_size=32, compression="zstd")
    ref = pq.read_table(src).slice(32, 32)  # row group 1
    data, f = src.read_bytes(), tmp_path / "flipped.parquet"
    silent = errors = 0
    for offset in chunk_bytes(src, 1, "cand_item_id"):
        damaged = bytearray(data)
        damaged[offset] ^= 0x01
        f.write_bytes(bytes(damaged))
        try:
            silent += not read_row_group(open_parquet(f), f, 1).equals(ref)
        except DataValidationError:
            errors += 1
    assert errors > 0
    assert (silent == 0) if checksums else (silent > 0), (silent, errors)


def test_corrupted_page_names_file_and_row_group(tiny: PreparedDataset, cli: dict[str, CliRun]) -> None:
    """A flipped bit in a data page: the page checksum catches it (it would often decode to wrong ids).
    Read in a DataLoader worker on the CLI (the refusal must not carry the worker's traceback), in the
    main process through the API."""
    run = cli["corrupted"]
    f = run.dataset / "train" / "part-00000.parquet"
    assert f.read_bytes() != tiny.splits["train"][0].read_bytes()
    assert_refused(run.proc, f"{f}, row group 1: cannot be read", "checksum", "corrupted")
    assert file_digests(run.dataset) == run.before
    with pytest.raises(DataValidationError, match=re.escape(f"{f}, row group 1: cannot be read")):
        list(RequestLoader([f], tiny.schema, LoaderConfig(batch_size=16)))


# ------------------------------------------------------------------------------------------- schema.json
def test_garbage_schema_json_is_named(cli: dict[str, CliRun]) -> None:
    run = cli["garbage_schema"]
    assert (run.dataset / "schema.json").read_bytes() == b'{"sparse": [\x00\xff'
    assert_refused(run.proc, f"{run.dataset / 'schema.json'}: ")
    assert file_digests(run.dataset) == run.before


WRONG_STRUCTURE = [
    (lambda s: [s], "expected a JSON object of schema fields, got list"),
    (lambda s: {**s, "num_itemz": 5}, r"unknown key\(s\) \['num_itemz'\]"),
    (lambda s: {k: v for k, v in s.items() if k != "num_items"}, r"missing key\(s\) \['num_items'\]"),
    (lambda s: {**s, "sparse": 3}, "key 'sparse' = 3: expected a list of"),
    (lambda s: {**s, "sparse": [{"name": "x"}]}, "key 'sparse'"),
    (lambda s: {**s, "num_items": "200"}, "key 'num_items' = '200': expected an integer"),
    (lambda s: {**s, "num_items": True}, "key 'num_items' = True: expected an integer"),
    (lambda s: {**s, "has_true_prob": "yes"}, "key 'has_true_prob'"),
    (lambda s: {**s, "tasks": ["click", 3]}, "key 'tasks'"),
    (lambda s: {**s, "num_items": 1}, "num_items must be >= 2"),
    (lambda s: {**s, "SEQ_FIELDS": ["item_id"]}, "key 'SEQ_FIELDS'"),
]


@pytest.mark.parametrize(("damage", "message"), WRONG_STRUCTURE)
def test_schema_json_with_wrong_structure(tiny: PreparedDataset, tmp_path: Path, damage, message: str) -> None:
    (tmp_path / "schema.json").write_text(json.dumps(damage(json.loads(tiny.schema.to_json()))))
    with pytest.raises(DataValidationError, match=re.escape(f"{tmp_path / 'schema.json'}: not a valid data schema: ") + message):
        read_schema(tmp_path)


def test_garbage_summary_json_is_named(tiny: PreparedDataset, tmp_path: Path) -> None:
    ds = copy_of(tiny, tmp_path)
    (ds / "summary.json").write_text("[1, 2")
    with pytest.raises(DataValidationError, match=re.escape(f"{ds / 'summary.json'}: not a readable JSON file")):
        prepare_dataset(parquet_cfg(ds), progress=False)


# ----------------------------------------------------------------------------------------------- quant
def test_quant_refuses_a_codebook_larger_than_the_catalog(cli: dict[str, CliRun]) -> None:
    """codebook_size=1000000 on 200 items ran for minutes with no output."""
    run = cli["quant"]
    assert_refused(run.proc, "codebook_size=1000000", "200 items", "codebook_size <= 200")
    assert run.seconds < 60
    assert not (run.work / "q" / "sids.pt").exists()


def test_auto_codebook_never_exceeds_the_catalog() -> None:
    assert auto_codebook_size(3, 3) == 3 and auto_codebook_size(200, 3) == 16 and auto_codebook_size(10**6, 2) == 256


def test_rq_kmeans_shows_progress(capsys: pytest.CaptureFixture[str]) -> None:
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    RQKMeans(2, 4, iters=3).fit(x, progress=False)
    assert "rq_kmeans" not in capsys.readouterr().err
    RQKMeans(2, 4, iters=3).fit(x, progress=True)
    assert "rq_kmeans" in capsys.readouterr().err
