"""In-memory request columns -> Parquet files of the contract, and the layout of a prepared directory.

Request columns are a ``dict`` from Parquet column name to either a numpy array
``[N]`` (scalar columns) or a :class:`Jagged` (list columns). The writer turns each
row group's slice into an Arrow table of exactly ``schema.arrow_schema()``.

Layout of a prepared dataset directory::

    <dir>/schema.json                 DataSchema.to_json()
    <dir>/summary.json                counts, rates, history stats, timings (written last)
    <dir>/<split>/part-00000.parquet  split in {train, valid, test}

Reading: :func:`open_parquet` and :func:`read_row_group` are the one way a data file is opened and a
row group read (:func:`read_parquet_table` reads a whole file through them); a missing, empty, truncated or corrupted file becomes a
:class:`~recsys.data.validate.DataValidationError` naming the file (and the row group), never a bare
pyarrow error. Writers store a CRC32 checksum per data page and readers verify it, so a flipped byte in
the data is reported rather than decoded into wrong values.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.data.jagged import Jagged
from recsys.data.schema import DataSchema
from recsys.data.validate import DataValidationError

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
    with pq.ParquetWriter(path, schema.arrow_schema(), compression="zstd", write_page_checksum=True) as writer:
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
    """The :class:`DataSchema` stored as ``<directory>/schema.json``.

    A missing or unreadable file, invalid JSON, or valid JSON of the wrong structure (unknown key, wrong
    type, impossible size) raises :class:`DataValidationError` naming the file and what is wrong.
    """
    path = Path(directory) / "schema.json"
    if not path.is_file():
        raise DataValidationError(f"{path} not found: {directory} is not a prepared dataset directory "
                                  "(schema.json + train/ valid/ test/ of Parquet files)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataValidationError(f"{path}: cannot be read ({exc})") from exc
    try:
        return DataSchema.from_json(text)
    except json.JSONDecodeError as exc:
        raise DataValidationError(f"{path}: not valid JSON ({exc}); schema.json is written by "
                                  "recsys.data.prepare.write_dataset") from exc
    except (TypeError, ValueError) as exc:
        raise DataValidationError(f"{path}: not a valid data schema: {exc}") from exc


def read_json_file(path: Path) -> dict:
    """A JSON object stored beside the data (e.g. summary.json); garbage -> :class:`DataValidationError`."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataValidationError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(raw, dict):
        raise DataValidationError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _arrow_reason(exc: BaseException) -> str:
    """pyarrow's message on one line (some span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def open_parquet(path: str | Path) -> pq.ParquetFile:
    """Opens a data file (reads its footer), verifying page checksums on every later read.

    A missing, 0-byte, truncated or non-Parquet file raises :class:`DataValidationError` naming it.
    """
    try:
        return pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as exc:
        raise DataValidationError(f"{path}: not a readable Parquet file ({_arrow_reason(exc)}): the file is "
                                  "missing, empty, truncated or not Parquet; write it again") from exc


def read_row_group(pf: pq.ParquetFile, path: str | Path, row_group: int, columns: list[str] | None = None
                   ) -> pa.Table:
    """Row group ``row_group`` of the opened ``pf`` (``path`` names it in errors).

    Damaged pages (bad checksum, undecodable data) raise :class:`DataValidationError` naming file and row group.
    """
    try:
        return pf.read_row_group(row_group, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DataValidationError(f"{path}, row group {row_group}: cannot be read ({_arrow_reason(exc)}): the "
                                  "file is corrupted; write it again") from exc


def read_parquet_table(path: str | Path, columns: list[str] | None = None, pf: pq.ParquetFile | None = None
                       ) -> pa.Table:
    """The whole file at ``path`` (``columns``: only those), read row group by row group through
    :func:`open_parquet` / :func:`read_row_group` (``pf``: the file already opened by the caller).

    A missing, empty, truncated or corrupted file, or a requested column the file lacks (pyarrow would
    silently leave it out), raises :class:`DataValidationError` naming the file (and row group / columns).
    """
    pf = open_parquet(path) if pf is None else pf
    names = pf.schema_arrow.names
    if columns is not None and (missing := [c for c in columns if c not in names]):
        raise DataValidationError(f"{path}: no column(s) {missing} in this Parquet file (it has {names})")
    groups = [read_row_group(pf, path, g, columns) for g in range(pf.num_row_groups)]
    if not groups:  # a file of 0 row groups still has a schema
        empty = pf.schema_arrow.empty_table()
        return empty.select(columns) if columns is not None else empty
    return pa.concat_tables(groups)


def split_files(directory: str | Path) -> dict[str, list[Path]]:
    """``{"train": [...], "valid": [...], "test": [...]}``: the Parquet files of each split, sorted."""
    directory = Path(directory)
    return {s: sorted((directory / s).glob("*.parquet")) for s in SPLITS}


def split_rows(files: list[Path]) -> int:
    """Requests in ``files``, from the Parquet footers (every footer is read: a damaged one is reported)."""
    return sum(open_parquet(f).metadata.num_rows for f in files)
