"""Raw <-> dense id maps of a prepared dataset, so scores and top-K lists join back to your own catalog.

Ingest re-encodes every raw id to a dense id ``1..n`` (sorted raw order; 0 = unknown). The maps are
written with the dataset (inside its temporary directory, renamed into place with it) as Parquet:

``id_maps/users.parquet``
    ``raw_id``, ``dense_id``, and one column per user sparse feature: the user's dense feature value
    (0 = the user is not in the user table), so a new log of the same users needs no user table.
``id_maps/items.parquet``
    ``raw_id``, ``dense_id``, ``category`` (the item's dense category, 0 = none in the item table).
``id_maps/categories.parquet``, ``id_maps/actions.parquet``
    ``raw_id``, ``dense_id`` (categories: only with an item table; actions: only with an action column).
``id_maps/feature_<name>.parquet``
    ``raw_id``, ``dense_id`` of the values of user sparse feature ``<name>``.

``raw_id`` keeps the raw dtype after the ingest's id normalization (Int64 for integer ids, String for
text ids). Synthetic data has no raw ids, hence no maps: its dense ids are the only ids.
Lookups are polars joins over whole columns, never Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from recsys.data.config import OovPolicy
from recsys.data.event_input import cast_ids
from recsys.data.schema import DataSchema
from recsys.errors import InputError
from recsys.reliability.atomic import atomic_write

ID_MAPS_DIR = "id_maps"
RAW, DENSE = "raw_id", "dense_id"
FEATURE_PREFIX = "feature_"
RAW_COLUMNS = {"user_id": ("users", "raw_user_id"), "item_id": ("items", "raw_item_id")}
"""Dense output column -> (map table, raw output column) of :func:`with_raw_ids`."""
ENTITY = {"users": "user", "items": "item", "categories": "category", "actions": "action"}
"""How messages name one id of a table."""


def vocab_table(vocab: pl.Series, **extra: np.ndarray) -> pl.DataFrame:
    """The map of a vocabulary (raw value of dense id ``i`` at position ``i - 1``) plus per-id columns."""
    table = pl.DataFrame({RAW: vocab.rename(RAW), DENSE: np.arange(1, len(vocab) + 1, dtype=np.int64)})
    return table.with_columns(**{k: pl.Series(k, np.asarray(v, dtype=np.int64)) for k, v in extra.items()})


@dataclass
class IdMaps:
    """The id maps of one dataset: ``tables[name]`` has ``raw_id`` and ``dense_id`` (see the module docstring)."""

    tables: dict[str, pl.DataFrame]
    schema: DataSchema | None = None
    """The dataset's schema when read from a directory (table sizes of the id space)."""
    path: Path | None = None
    """The ``id_maps/`` directory read from, if any."""

    def __contains__(self, name: str) -> bool:
        return name in self.tables

    def table(self, name: str) -> pl.DataFrame:
        if name not in self.tables:
            raise InputError(f"id maps{f' {self.path}' if self.path else ''} have no table {name!r} "
                             f"(tables: {sorted(self.tables)})")
        return self.tables[name]

    def raw_dtype(self, name: str) -> pl.DataType:
        return self.table(name)[RAW].dtype

    def size(self, name: str) -> int:
        """Largest dense id of a table (ids are ``1..size``)."""
        return self.table(name).height

    def to_raw(self, name: str, dense: np.ndarray | pl.Series) -> pl.Series:
        """Raw id of every dense id (null for 0 and for any id the map lacks), in input order."""
        ids = pl.Series(DENSE, np.asarray(dense), dtype=pl.Int64)
        joined = ids.to_frame().join(self.table(name).select(RAW, DENSE), on=DENSE, how="left",
                                     maintain_order="left")
        return joined[RAW]

    def to_dense(self, name: str, raw: pl.Series | np.ndarray | list, what: str = "ids") -> pl.Series:
        """Dense id of every raw id (null where unknown), in input order. Raw ids are normalized and cast to
        the stored raw dtype (``9.0`` is ``9``; an id that cannot be cast is an ``InputError`` naming ``what``)."""
        raw = raw if isinstance(raw, pl.Series) else pl.Series(RAW, raw)
        ids = cast_ids(raw, self.raw_dtype(name), what).rename(RAW)  # a refusal names the caller's column
        return ids.to_frame().join(self.table(name).select(RAW, DENSE), on=RAW, how="left",
                                   maintain_order="left", nulls_equal=False)[DENSE]

    def lookup(self, name: str, raw: pl.Series, policy: OovPolicy, where: str) -> tuple[np.ndarray, int, int]:
        """``(dense ids [N] with unknown -> 0, distinct unknown ids, rows with one)`` under ``policy``:
        ``error`` refuses any unknown id (``InputError`` naming the table, the count and examples)."""
        dense = self.to_dense(name, raw, where)
        unknown = dense.is_null()
        n_rows = int(unknown.sum())
        n_ids = int(raw.filter(unknown).n_unique()) if n_rows else 0
        if n_rows and OovPolicy(policy) == OovPolicy.error:
            examples = raw.filter(unknown).unique(maintain_order=True).head(5).to_list()
            raise InputError(f"{where}: {n_ids} {ENTITY.get(name, name)} id(s) in {n_rows} row(s) are not in the "
                             f"stored id maps "
                             f"{self.path or ''} (e.g. {examples}); data.oov_policy=oov encodes them as the "
                             "unknown id 0 (counted), data.oov_policy=error (the default) refuses them")
        return dense.fill_null(0).to_numpy().astype(np.int64), n_ids, n_rows

    def write(self, dataset_dir: Path) -> None:
        """Every table to ``<dataset_dir>/id_maps/<name>.parquet`` (each file written atomically)."""
        out = Path(dataset_dir) / ID_MAPS_DIR
        out.mkdir(parents=True, exist_ok=True)
        for name, table in self.tables.items():
            arrow = table.to_arrow()
            atomic_write(out / f"{name}.parquet", lambda f, t=arrow: pq.write_table(t, f, compression="zstd"))

    @classmethod
    def read(cls, dataset_dir: str | Path) -> IdMaps | None:
        """The maps of a prepared dataset directory, or None when it has none (synthetic data).

        Each file must hold ``raw_id`` and ``dense_id`` with dense ids exactly ``1..n`` and distinct raw
        ids; a damaged file is an ``InputError`` naming it.
        """
        from recsys.data.parquet_io import read_schema

        directory = Path(dataset_dir) / ID_MAPS_DIR
        if not directory.is_dir():
            return None
        tables = {p.stem: _read_table(p) for p in sorted(directory.glob("*.parquet"))}
        schema = read_schema(Path(dataset_dir)) if (Path(dataset_dir) / "schema.json").is_file() else None
        return cls(tables, schema, directory)

    def feature_names(self) -> list[str]:
        """User sparse features with a value map, in schema order when known."""
        names = [n[len(FEATURE_PREFIX):] for n in self.tables if n.startswith(FEATURE_PREFIX)]
        if self.schema is not None:
            order = [f.name for f in self.schema.sparse]
            names.sort(key=lambda n: order.index(n) if n in order else len(order))
        return names


def with_raw_ids(columns: dict[str, Any], maps: IdMaps | None) -> dict[str, Any]:
    """Output columns with ``raw_user_id`` / ``raw_item_id`` (Arrow arrays, null for an unknown dense id)
    right after ``user_id`` / ``item_id``, when ``maps`` are given; as they are without maps (synthetic
    data: dense ids are the only ids)."""
    if maps is None:
        return columns
    out: dict[str, Any] = {}
    for name, values in columns.items():
        out[name] = values
        if name in RAW_COLUMNS:
            table, raw_name = RAW_COLUMNS[name]
            out[raw_name] = maps.to_raw(table, np.asarray(values)).to_arrow()
    return out


def _read_table(path: Path) -> pl.DataFrame:
    try:
        table = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise InputError(f"{path}: not a readable id map ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "prepare the dataset again") from e
    if not {RAW, DENSE} <= set(table.columns) or not table[DENSE].dtype.is_integer():
        raise InputError(f"{path}: an id map needs columns {RAW}, {DENSE} (integer); it has {table.schema}")
    dense = table[DENSE].to_numpy()
    if not np.array_equal(np.sort(dense), np.arange(1, len(dense) + 1)) or table[RAW].null_count() \
            or table[RAW].n_unique() != len(dense):
        raise InputError(f"{path}: damaged id map: dense ids must be 1..{len(dense)} once each and raw ids "
                         "distinct and not null; prepare the dataset again")
    return table.sort(DENSE)


__all__ = ["DENSE", "FEATURE_PREFIX", "ID_MAPS_DIR", "RAW", "RAW_COLUMNS", "IdMaps", "vocab_table", "with_raw_ids"]
