"""In-memory request columns -> Parquet files of the contract, and the layout of a prepared directory.

Request columns are a ``dict`` from Parquet column name to either a numpy array
``[N]`` (scalar columns) or a :class:`Jagged` (list columns). The writer turns each
row group's slice into an Arrow table of exactly ``schema.arrow_schema()``.

Layout of a prepared dataset directory::

    <dir>/schema.json                 DataSchema.to_json()
    <dir>/summary.json                counts, rates, history stats, timings (written last)
    <dir>/<split>/part-00000.parquet  split in {train, valid, test}
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.data.jagged import Jagged
from recsys.data.schema import DataSchema

SPLITS = ("train", "valid", "test")
RequestColumns = dict[str, "np.ndarray | Jagged"]


def num_rows(cols: RequestColumns) -> int:
    first = next(iter(cols.values()))
    return first.num_rows if isinstance(first, Jagged) else len(first)


def take_rows(cols: RequestColumns, rows: np.ndarray) -> RequestColumns:
    """The given rows of every column, in that order."""
    return {k: (v.take(rows) if isinstance(v, Jagged) else v[rows]) for k, v in cols.items()}


def _arrow_column(v: np.ndarray | Jagged, typ: pa.DataType, start: int, stop: int) -> pa.Array:
    if isinstance(v, Jagged):
        part = v.slice(start, stop)
        values = pa.array(part.values, type=typ.value_type)
        return pa.ListArray.from_arrays(pa.array(part.offsets.astype(np.int32)), values)
    return pa.array(v[start:stop], type=typ)


def to_arrow(cols: RequestColumns, schema: DataSchema, start: int = 0, stop: int | None = None) -> pa.Table:
    """Rows ``start:stop`` as an Arrow table with exactly ``schema.arrow_schema()``."""
    target = schema.arrow_schema()
    stop = num_rows(cols) if stop is None else stop
    missing = [f.name for f in target if f.name not in cols]
    if missing:
        raise KeyError(f"request columns lack {missing}")
    arrays = [_arrow_column(cols[f.name], f.type, start, stop) for f in target]
    table = pa.Table.from_arrays(arrays, schema=target)
    return table


def write_requests(cols: RequestColumns, schema: DataSchema, path: Path, row_group_size: int,
                   on_row_group: Callable[[], object] | None = None) -> Path:
    """Writes the rows in row groups of ``row_group_size`` requests (an empty split gives a 0-row file).

    Each row group is built from numpy slices and written on its own, so peak memory
    is one row group of Arrow data on top of the columns.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    n = num_rows(cols)
    with pq.ParquetWriter(path, schema.arrow_schema(), compression="zstd") as writer:
        for start in range(0, n, row_group_size):
            writer.write_table(to_arrow(cols, schema, start, min(n, start + row_group_size)),
                               row_group_size=row_group_size)
            if on_row_group is not None:
                on_row_group()
    return path


def write_schema(schema: DataSchema, directory: Path) -> Path:
    path = directory / "schema.json"
    path.write_text(schema.to_json())
    return path


def read_schema(directory: str | Path) -> DataSchema:
    """The :class:`DataSchema` stored as ``<directory>/schema.json``."""
    path = Path(directory) / "schema.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a prepared dataset directory")
    return DataSchema.from_json(path.read_text())


def split_files(directory: str | Path) -> dict[str, list[Path]]:
    """``{"train": [...], "valid": [...], "test": [...]}``: the Parquet files of each split, sorted."""
    directory = Path(directory)
    return {s: sorted((directory / s).glob("*.parquet")) for s in SPLITS}
