"""``prepare_dataset``: config -> a cached directory of request-row Parquet files.

Output: ``<root>/<source>-<hash>/`` (see ``parquet_io`` for the layout), where the
hash covers every config field that changes the rows (plus ``FORMAT_VERSION``).
It is built in a temporary sibling directory and renamed into place, so a reader
never sees half a dataset; a later call with the same config returns the existing
directory without regenerating (``PreparedDataset.cached``).

Opening checks what a reader needs before any work: schema.json parses into a valid schema, and every
split the caller names in ``need`` (default: train) holds at least one request, every footer of it
readable (:func:`require_splits`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from recsys.data.config import DataConfig, DataSource
from recsys.data.id_maps import IdMaps
from recsys.data.ingest import SPLIT_CODES
from recsys.data.parquet_io import (
    SPLITS,
    RequestColumns,
    read_json_file,
    read_schema,
    split_files,
    split_rows,
    take_rows,
    write_requests,
    write_schema,
)
from recsys.data.schema import DataSchema
from recsys.data.stats import summarize
from recsys.errors import InputError
from recsys.reliability.digest import json_digest
from recsys.reliability.rundir import check_output_dir

FORMAT_VERSION = 1
"""Bump when generation / ingest changes the rows, so stale caches are not reused."""
OPTIONAL_SYNTHETIC_FIELDS: dict[str, object] = {"cold_item_fraction": 0.0, "long_range_weight": 0.0,
                                                 "long_range_window": 32}
"""Synthetic fields added after datasets were cached: left out of the key while at these defaults."""


@dataclass
class PreparedDataset:
    """A prepared dataset directory, ready for :class:`recsys.data.loader.RequestLoader`."""

    schema: DataSchema
    """Columns and table sizes of every file."""
    splits: dict[str, list[Path]]
    """Parquet files of "train", "valid", "test"."""
    summary: dict
    """Counts, positive rates, history stats, oracle AUC (synthetic), timings (see summary.json)."""
    path: Path | None = None
    """The directory (schema.json, summary.json, <split>/*.parquet)."""
    cached: bool = False
    """True when an existing directory was reused."""


def as_data_config(cfg: DataConfig | DictConfig) -> DataConfig:
    """A :class:`DataConfig` instance from an OmegaConf node (runs ``__post_init__`` checks)."""
    if isinstance(cfg, DataConfig):
        return cfg
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), cfg)
    return OmegaConf.to_object(merged)


def _plain(obj: object) -> object:
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def config_key(cfg: DataConfig) -> dict:
    """The config fields that determine the prepared rows."""
    key: dict = {"source": cfg.source.value, "format_version": FORMAT_VERSION, "row_group_size": cfg.row_group_size}
    if cfg.source == DataSource.synthetic:
        key["synthetic"] = _plain(cfg.synthetic)
        for name, default in OPTIONAL_SYNTHETIC_FIELDS.items():  # at its default: same key (and hash) as before
            if key["synthetic"].get(name) == default:
                del key["synthetic"][name]
    elif cfg.source == DataSource.ml100k:
        key["ml100k"] = {"recbole_version": cfg.ml100k.recbole_version, "like_threshold": cfg.ml100k.like_threshold}
        if cfg.ml100k.cold_item_fraction > 0:  # absent at 0: same key (and hash) as before the option existed
            key["ml100k"].update(cold_item_fraction=cfg.ml100k.cold_item_fraction, cold_seed=cfg.ml100k.cold_seed)
    elif cfg.source == DataSource.eventlog:
        from recsys.data.eventlog import eventlog_key
        key["eventlog"] = eventlog_key(cfg)  # the files by content (SHA-256), never by path or mtime
    return key


def config_hash(cfg: DataConfig) -> str:
    return json_digest(config_key(cfg), 10)


def dataset_dir(cfg: DataConfig) -> Path:
    if cfg.source == DataSource.parquet:
        return Path(cfg.path)
    return Path(cfg.root) / f"{cfg.source.value}-{config_hash(cfg)}"


def ml100k_raw_dir(cfg: DataConfig) -> Path:
    """Where the ml-100k files are read from (and the recbole wheel downloaded to): ``data.ml100k.raw_dir``,
    else ``<root>/raw``."""
    return Path(cfg.ml100k.raw_dir) if cfg.ml100k.raw_dir else Path(cfg.root) / "raw"


def raw_inputs(cfg: DataConfig) -> list[tuple[str, Path]]:
    """The raw inputs building the dataset of ``cfg`` reads, as ``(config key, path)``: the ml-100k raw dir;
    an event log, its side tables and the dataset whose id maps it uses. Synthetic data reads nothing; a
    prepared ``data.path`` is read, not built."""
    if cfg.source == DataSource.ml100k:
        return [("data.ml100k.raw_dir", ml100k_raw_dir(cfg))]
    if cfg.source == DataSource.eventlog:
        ev = cfg.eventlog
        named = [(f"{ev.KEY}.{k}", Path(v)) for k, v in ev.input_files().items()]
        return named + ([(f"{ev.KEY}.id_maps_from", Path(ev.id_maps_from))] if ev.id_maps_from else [])
    return []


def check_build_dir(cfg: DataConfig, out: Path) -> None:
    """Refuse to build ``out`` (``<root>/<source>-<hash>``, built in a temp sibling under ``data.root``) where it
    would write into a raw input: ``out`` is, lies inside or contains one (e.g. ``data.root`` = the ml-100k raw
    dir, or inside the dataset whose id maps a log uses), or ``data.root`` is the folder holding an input file
    (the build would add its folders beside your event log). Raises ``InputError`` naming both."""
    inputs = raw_inputs(cfg)
    check_output_dir(out, inputs, key="output dataset (data.root/<source>-<hash>)")
    root = out.parent.resolve()
    for key, path in inputs:
        if path.is_file() and path.resolve().parent == root:
            raise InputError(f"data.root={cfg.root} is the folder of the input {key}={path}: building the dataset "
                             f"would write {out.name}/ and a temp folder beside it, and a command never writes into "
                             "its inputs' folders; choose a data.root that is not the folder of an input file (the "
                             "default, data/, or any new folder)")


def dataset_inputs(cfg: DataConfig) -> list[tuple[str, Path]]:
    """What opening (or building) the dataset of ``cfg`` reads, as ``(config key, path)``: the dataset
    directory (``data.path``, or ``<root>/<source>-<hash>``) and its raw files. A command's output
    directory must overlap none of them (``recsys.reliability.rundir.check_output_dir``)."""
    key = "data.path" if cfg.source == DataSource.parquet else "dataset"
    return [(key, dataset_dir(cfg)), *raw_inputs(cfg)]


def write_dataset(out_dir: Path, schema: DataSchema, cols: RequestColumns, split: np.ndarray, *,
                  row_group_size: int, seed: int, progress: bool = False, id_maps: IdMaps | None = None) -> dict:
    """Writes schema.json, ``id_maps/`` (when given: ``IngestResult.id_maps``) and one Parquet file per split;
    returns the per-split summaries.

    Train rows are written in a seeded random order (so every row group is a mix of
    users and times); valid and test rows in request order.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    write_schema(schema, out_dir)
    if id_maps is not None:
        id_maps.write(out_dir)
    rng = np.random.default_rng(seed)
    per_split = {}
    n_groups = sum(-(-int((split == SPLIT_CODES[s]).sum()) // row_group_size) for s in SPLITS)
    with tqdm(total=n_groups, desc="write", unit="rg", disable=not progress, leave=False) as bar:
        for name in SPLITS:
            rows = np.flatnonzero(split == SPLIT_CODES[name])
            if name == "train":
                rows = rng.permutation(rows)
            part = take_rows(cols, rows)
            write_requests(part, schema, out_dir / name / "part-00000.parquet", row_group_size,
                           on_row_group=bar.update)
            per_split[name] = summarize(part, schema)
    return per_split


def _build(cfg: DataConfig, out_dir: Path, progress: bool) -> dict:
    t0 = time.perf_counter()
    extra: dict = {}
    id_maps = None
    if cfg.source == DataSource.synthetic:
        from recsys.data.synthetic import generate
        data = generate(cfg.synthetic)
        schema, cols, split, timings, seed = data.schema, data.columns, data.split, data.timings, cfg.synthetic.seed
        extra["events"] = data.num_events
    elif cfg.source == DataSource.ml100k:
        from recsys.data.ml100k import ensure_ml100k, ingest_ml100k
        files = ensure_ml100k(ml100k_raw_dir(cfg), cfg.ml100k.recbole_version, download=cfg.ml100k.download)
        data = ingest_ml100k(files, like_threshold=cfg.ml100k.like_threshold,
                             cold_item_fraction=cfg.ml100k.cold_item_fraction, cold_seed=cfg.ml100k.cold_seed)
        schema, cols, split, timings, seed = data.schema, data.columns, data.split, data.timings, 0
        extra["protocol"] = "ml-100k CTR: one request per rating, like = rating >= " \
            f"{cfg.ml100k.like_threshold}, per-user leave-one-out by time (ties: file order)"
        extra.update(data.counters)  # what the input policies did (duplicates dropped, ids normalized, unit)
        if data.cold_items is not None:
            extra["protocol"] += f"; {len(data.cold_items)} movies held out as cold items (every rating -> test)"
            extra["cold_items"] = data.cold_items.tolist()
        id_maps = data.id_maps
    elif cfg.source == DataSource.eventlog:
        from recsys.data.eventlog import ingest_configured
        data, extra = ingest_configured(cfg)
        schema, cols, split, timings, seed = data.schema, data.columns, data.split, data.timings, cfg.eventlog.seed
        id_maps = data.id_maps
    else:
        raise ValueError(f"cannot build source {cfg.source!r}")
    t_rows = time.perf_counter()
    per_split = write_dataset(out_dir, schema, cols, split, row_group_size=cfg.row_group_size, seed=seed,
                              progress=progress, id_maps=id_maps)
    t_write = time.perf_counter()
    total = summarize(cols, schema)
    summary = {
        "source": cfg.source.value,
        "config": config_key(cfg),
        **extra,
        **total,
        "num_items_table": schema.num_items,
        "splits": per_split,
        "timings": {**{k: round(v, 3) for k, v in timings.items()}, "rows_s": round(t_rows - t0, 3),
                    "write_s": round(t_write - t_rows, 3), "total_s": round(time.perf_counter() - t0, 3)},
    }
    if schema.has_true_prob:
        summary["oracle_auc_per_split"] = {s: per_split[s].get("oracle_auc") for s in SPLITS}
    return summary


def _load(directory: Path, cfg: DataConfig, cached: bool) -> PreparedDataset:
    schema = dataclasses.replace(read_schema(directory), oov_policy=cfg.oov_policy.value)
    summary_path = directory / "summary.json"
    summary = read_json_file(summary_path) if summary_path.is_file() else {}
    return PreparedDataset(schema=schema, splits=split_files(directory), summary=summary, path=directory,
                           cached=cached)


def require_splits(ds: PreparedDataset, need: Iterable[str]) -> None:
    """Every split in ``need`` holds at least one request; every footer of those splits is read, so a
    0-byte, truncated or non-Parquet file there is refused now, not after hours of work.

    Raises :class:`~recsys.errors.InputError` naming the dataset directory and the split.
    """
    for name in need:
        if name not in ds.splits:
            raise InputError(f"dataset {ds.path}: no split {name!r} (splits: {', '.join(SPLITS)})")
        files = ds.splits[name]
        if not files:
            raise InputError(f"dataset {ds.path}: split {name!r} is empty: no {ds.path}/{name}/*.parquet files; "
                             "prepare the dataset again (python -m recsys.data) or fix data.path")
        if split_rows(files) == 0:
            raise InputError(f"dataset {ds.path}: split {name!r} is empty: its {len(files)} Parquet file(s) hold "
                             "0 requests; prepare the dataset again (python -m recsys.data) or fix data.path")


def prepare_dataset(cfg: DataConfig | DictConfig, *, progress: bool = True,
                    need: Iterable[str] = ("train",), build: bool = True) -> PreparedDataset:
    """Generates / ingests the configured dataset once and returns its files (cached by config hash).

    ``need``: splits the caller reads, which must not be empty (:func:`require_splits`); the default, the
    train split, is what every command reads (training, the loader pass, popularity counts). Training
    passes all three: it validates on valid and reports on test. ``build=False``: only open an existing
    dataset (``InputError`` if there is none), e.g. the dataset a checkpoint was trained on.
    """
    cfg = as_data_config(cfg)
    ds = _open_or_build(cfg, progress, build)
    require_splits(ds, need)
    return ds


def _open_or_build(cfg: DataConfig, progress: bool, build: bool = True) -> PreparedDataset:
    if cfg.source == DataSource.eventlog:
        from recsys.data.eventlog import check_inputs
        check_inputs(cfg.eventlog)  # the column mapping against every header, before hashing the files
    out = dataset_dir(cfg)
    if cfg.source == DataSource.parquet:
        return _load(out, cfg, cached=True)
    if (out / "summary.json").is_file():
        return _load(out, cfg, cached=True)
    if not build:
        files = f" {cfg.eventlog.input_files()}" if cfg.source == DataSource.eventlog else ""
        raise InputError(f"no prepared dataset {out} for this data config: its input files{files} are not the ones "
                         "it was prepared from (changed since?), and a model's ids are those of its dataset: restore the "
                         "files, or point data.source=parquet data.path at the dataset it was prepared from")
    check_build_dir(cfg, out)  # before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    try:
        summary = _build(cfg, tmp, progress)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "summary.json").is_file():  # not a concurrent twin that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return _load(out, cfg, cached=False)
