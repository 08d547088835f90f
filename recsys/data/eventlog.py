"""``data.source=eventlog``: your own event log (CSV / TSV / Parquet) as a cached prepared dataset.

    python -m recsys.data data=eventlog data.eventlog.events=events.csv data.eventlog.columns.item_id=movieId

The options are ``config.EventLogConfig`` (every ``ingest_event_log`` option, plus the files and the
column mapping). Order of the checks, all before any work: the config (option ranges, the files exist),
then every table's header against the column mapping, then the content identity of the files for the
cache key, then the ingest itself.

**Cache key.** The dataset lands in ``<root>/eventlog-<hash>/``; the hash covers every option and the
SHA-256 (and size) of every input file, not its path or mtime: a changed log is ingested again, while
a copy, a move or a ``touch`` of the same bytes reuses the dataset. Hashing reads the files once per
process (about 1 s per GB; the digest is kept for the process, keyed by path, size and mtime).

**Id maps.** The dataset stores its raw <-> dense id maps under ``id_maps/`` (``recsys.data.id_maps``).
With ``data.eventlog.id_maps_from=<a prepared eventlog dataset>`` a new log of the same catalog is
encoded with *that* dataset's maps and schema (``ingest.encode_with_maps``): its rows fit the
checkpoints trained on it; unknown items / actions follow ``data.oov_policy`` (counted in summary.json).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from omegaconf import OmegaConf

from recsys.data.config import DataConfig, DataSource, EventLogConfig, OovPolicy
from recsys.data.id_maps import ID_MAPS_DIR, IdMaps
from recsys.data.ingest import IngestResult, ingest, read_tables
from recsys.errors import InputError
from recsys.reliability.digest import file_sha256

FILE_FIELDS = ("events", "item_features", "user_features", "id_maps_from", "cold_items")


def file_identity(path: str | Path) -> dict[str, int | str]:
    """What identifies an input file in the cache key: its size and the SHA-256 of its bytes."""
    return {"bytes": Path(path).stat().st_size, "sha256": file_sha256(path)}


def base_identity(directory: str | Path) -> dict[str, dict]:
    """Identity of the dataset whose maps encode a new log: its schema.json and every id map file."""
    d = Path(directory)
    files = [d / "schema.json", *sorted((d / ID_MAPS_DIR).glob("*.parquet"))]
    return {str(p.relative_to(d)): file_identity(p) for p in files}


def eventlog_key(cfg: DataConfig) -> dict:
    """The cache-key part of an eventlog dataset: every option, the files by content, the base dataset's
    maps by content when ``id_maps_from`` is set (and then ``oov_policy``, which changes the rows)."""
    ev = cfg.eventlog
    options = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(ev), default=str)).items()
               if k not in FILE_FIELDS}
    key: dict = {"options": options, "files": {n: file_identity(p) for n, p in ev.input_files().items()}}
    if ev.cold_items:
        key["cold_items"] = list(ev.cold_items)
    if ev.id_maps_from:
        key["id_maps_from"] = base_identity(ev.id_maps_from)
        key["oov_policy"] = cfg.oov_policy.value
    return key


def check_inputs(ev: EventLogConfig) -> None:
    """Every table's header against the column mapping and the label column (``InputError`` naming the
    key, the value and the table's columns), before the files are hashed or read in full."""
    read_tables(ev.events, ev.item_features, ev.user_features, ev, header_only=True)


def ingest_configured(cfg: DataConfig) -> tuple[IngestResult, dict]:
    """Ingests the configured event log; returns the rows and the summary entries that describe it."""
    ev = cfg.eventlog
    maps = IdMaps.read(ev.id_maps_from) if ev.id_maps_from else None
    res = ingest(ev.events, ev, item_features=ev.item_features, user_features=ev.user_features,
                 cold_items=list(ev.cold_items) or None, maps=maps, oov_policy=cfg.oov_policy)
    extra: dict = {"protocol": f"event log {ev.events}: one request per event"
                   + (f" of kind {ev.target_kind!r}" if ev.target_kind else "")
                   + f", {ev.num_negatives} sampled negative(s), split {ev.split.value}",
                   "inputs": ev.input_files(), **res.counters}
    if maps is not None:
        extra["id_maps_from"] = ev.id_maps_from
        extra["protocol"] += f"; ids encoded with the maps of {ev.id_maps_from} (data.oov_policy=" \
                             f"{cfg.oov_policy.value})"
    if res.cold_items is not None:
        extra["cold_items"] = res.cold_items.tolist()
    return res, extra


def new_log_config(trained: DataConfig | dict, dataset_dir: str | Path, events: str | Path,
                   oov_policy: OovPolicy | str | None = None) -> DataConfig:
    """The data config of a new event log encoded with the maps of ``dataset_dir`` (the dataset a model was
    trained on; ``trained``: its data config, or the plain dict a checkpoint stores): same columns and
    options, the side tables and cold items dropped (they come from the maps), ``oov_policy`` (default:
    the trained config's) for unknown ids. The trained log's own files are not needed."""
    data = OmegaConf.structured(trained) if isinstance(trained, DataConfig) else OmegaConf.create(trained)
    source = DataSource(data.get("source", DataSource.synthetic))
    if source != DataSource.eventlog:
        raise InputError(f"a new event log is encoded with the id maps of an eventlog dataset, but this model was "
                         f"trained on data.source={source.value}")
    data.eventlog.update(events=str(events), item_features=None, user_features=None, cold_items=[],
                         id_maps_from=str(dataset_dir))
    if oov_policy is not None:
        data.oov_policy = OovPolicy(oov_policy).value
    from recsys.data.prepare import as_data_config
    return as_data_config(data)  # every check: the new log exists, the maps are a dataset's


__all__ = ["check_inputs", "new_log_config", "eventlog_key", "file_identity", "file_sha256", "ingest_configured"]
