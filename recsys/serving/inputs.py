"""What a scoring job reads: the request files (given, a new event log, or a split of the checkpoint's
dataset), the dataset the checkpoint was trained on, the id maps of the scored rows, and the scoring
``max_len``. ``trained_dataset`` is also how ``recsys.evaluate`` finds the split it reports on.

The data layer (Parquet, polars, the event-log ingest) is imported inside the functions that read data:
``python -m recsys.score`` checks that the ``inputs`` exist (``expand_files``) before it pays for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys.errors import InputError
from recsys.serving.config import ScoreConfig, ScoreMode

if TYPE_CHECKING:
    from recsys.data.id_maps import IdMaps
    from recsys.data.prepare import PreparedDataset


def expand_files(paths: list[str]) -> list[Path]:
    """Files as given; directories -> their ``*.parquet`` (sorted)."""
    out: list[Path] = []
    for s in paths:
        p = Path(s)
        if p.is_dir():
            out += sorted(p.glob("*.parquet"))
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"input {p} does not exist")
    return [p.resolve() for p in out]


@dataclass
class ScoreInputs:
    """What a job scores, and the id maps that turn its dense ids back into raw ones."""

    files: list[Path]
    """Request-row files to score."""
    dataset_files: list[Path]
    """Every file of the checkpoint's dataset when the inputs come from it (catalog categories), else []."""
    dataset_dirs: list[Path]
    """Dataset directories read (the checkpoint's; with ``inputs_eventlog`` also the new log's)."""
    id_maps: IdMaps | None = None
    """Raw <-> dense maps of the scored rows (None: synthetic data, or files of no single dataset)."""
    eventlog: dict[str, Any] | None = None
    """``inputs_eventlog``: the log, its dataset, the OOV policy and what it did (summary.json)."""


def resolve_inputs(cfg: ScoreConfig, ckpt_config: dict[str, Any]) -> ScoreInputs:
    """The files to score: ``inputs``, a new log (``inputs_eventlog``) encoded with the maps of the
    checkpoint's dataset, or split ``split`` of that dataset."""
    from recsys.data.eventlog import new_log_config
    from recsys.data.id_maps import IdMaps
    from recsys.data.prepare import prepare_dataset

    if cfg.inputs:
        files = expand_files(cfg.inputs)
        return ScoreInputs(files, [], [], inputs_id_maps(files))
    ds = trained_dataset(ckpt_config)
    dataset_files = [p.resolve() for fs in ds.splits.values() for p in fs]
    if cfg.inputs_eventlog:
        new_cfg = new_log_config(ckpt_config["data"], ds.path, cfg.inputs_eventlog, cfg.oov_policy)
        new = prepare_dataset(new_cfg, progress=False, need=("test",))  # every request of a new log is a test row
        info = {"events": cfg.inputs_eventlog, "dataset": str(new.path), "id_maps_from": str(ds.path),
                "oov_policy": new_cfg.oov_policy.value, **{k: new.summary[k] for k in INGEST_COUNTERS
                                                           if k in new.summary}}
        return ScoreInputs([p.resolve() for p in new.splits["test"]], dataset_files, [ds.path, new.path],
                           IdMaps.read(new.path), info)
    if cfg.split not in ds.splits:
        raise InputError(f"split={cfg.split!r} is not a split of the checkpoint's dataset {sorted(ds.splits)}")
    files = [p.resolve() for p in ds.splits[cfg.split]]
    return ScoreInputs(files, dataset_files, [ds.path], IdMaps.read(ds.path))


def trained_dataset(ckpt_config: dict[str, Any], need: Iterable[str] = ("train",)) -> PreparedDataset:
    """The dataset the checkpoint was trained on: the directory the checkpoint recorded (``dataset_dir``),
    opened as it is (no log is hashed or read again, so the run's log may have changed or moved since),
    else the one its data config names. An event log is never ingested again here: the checkpoint's ids
    are those of the dataset it was trained on. ``need``: splits that must exist and hold rows
    (``InputError`` naming the dataset otherwise)."""
    from omegaconf import OmegaConf

    from recsys.data.config import DataSource
    from recsys.data.prepare import as_data_config, prepare_dataset

    data = ckpt_config["data"]
    recorded = ckpt_config.get("dataset_dir")
    if recorded and (Path(recorded) / "schema.json").is_file():
        opened = {"source": "parquet", "path": recorded, "oov_policy": data.get("oov_policy", "error"),
                  "loader": data.get("loader", {})}
        return prepare_dataset(as_data_config(OmegaConf.create(opened)), progress=False, need=need)
    trained = as_data_config(OmegaConf.create(data))
    return prepare_dataset(trained, progress=False, need=need, build=trained.source != DataSource.eventlog)


def trained_dataset_inputs(ckpt_config: dict[str, Any]) -> list[tuple[str, str | Path | None]]:
    """What :func:`trained_dataset` may read, as ``(key, path)``: the recorded ``dataset_dir`` and the
    dataset (and raw files) its data config names. An output directory must overlap none of them."""
    from omegaconf import OmegaConf

    from recsys.data.prepare import as_data_config, dataset_inputs

    return [("dataset_dir", ckpt_config.get("dataset_dir")),
            *dataset_inputs(as_data_config(OmegaConf.create(ckpt_config["data"])))]


INGEST_COUNTERS = ("new_users", "unknown_items", "unknown_item_rows", "unknown_actions", "unknown_action_rows",
                   "duplicate_events_dropped", "user_ids_normalized", "item_ids_normalized", "timestamp_unit")
"""What ingesting ``inputs_eventlog`` did, copied into the scoring summary."""


def inputs_id_maps(files: list[Path]) -> IdMaps | None:
    """The id maps of the dataset directory holding every input file (``<dir>/<split>/*.parquet`` with
    ``<dir>/id_maps/``), or None when the files are of no single dataset with maps."""
    from recsys.data.id_maps import IdMaps

    dirs = {f.parent.parent for f in files}
    return IdMaps.read(dirs.pop()) if len(dirs) == 1 else None


def job_inputs(cfg: ScoreConfig, ckpt: Path, dataset_dirs: list[Path]) -> list[tuple[str, str | Path | None]]:
    """Everything the job reads, as ``(key, path)``: the output dir must overlap none of them."""
    named: list[tuple[str, str | Path | None]] = [("checkpoint", ckpt), *(("dataset", d) for d in dataset_dirs),
                                                  ("item_content", cfg.item_content),
                                                  ("inputs_eventlog", cfg.inputs_eventlog)]
    named += [("inputs", f) for f in cfg.inputs]
    if cfg.mode == ScoreMode.cascade:
        named += [("cascade.retrievers", r) for r in cfg.cascade.retrievers]
    if cfg.mode != ScoreMode.candidates:
        named += [("catalog.items_file", cfg.catalog.items_file)]
        named += [("catalog.category_files", f) for f in cfg.catalog.category_files]
    return named


def scoring_max_len(cfg: ScoreConfig, ckpt_config: dict[str, Any], ckpt: Path) -> int:
    """The trained ``data.loader.max_len``, or ``cfg.max_len`` when it equals it or is an allowed lower value."""
    trained = int(ckpt_config["data"]["loader"]["max_len"])
    if cfg.max_len is None or cfg.max_len == trained:
        return trained
    if cfg.max_len > trained:
        raise InputError(f"max_len={cfg.max_len} is above the trained data.loader.max_len={trained} of {ckpt}: the "
                         "model's pyramid was sized for the trained length; drop max_len to use the trained value")
    if not cfg.allow_max_len_change:
        raise InputError(f"max_len={cfg.max_len} differs from the trained data.loader.max_len={trained} of {ckpt}: "
                         "scores would silently differ from training's truncation; drop max_len to use the trained "
                         "value, or set allow_max_len_change=true to score shorter histories on purpose")
    return cfg.max_len
