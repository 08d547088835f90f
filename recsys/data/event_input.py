"""Reading and checking a raw event log before ingest: every refusal is an ``InputError`` naming the table
(its file path), the column, the row and the value; every silent fix is a documented policy with a counter.

Rows are counted from 0 over the data rows of the table (a CSV header is not a row), as read.

Policies (docs/reliability.md, "Hostile event logs"):

- **CSV / TSV** are read with standard quoting (``"1","a,b"`` is two fields ``1`` and ``a,b``), every row
  is used to infer the column types.
- **Ids** (``user_id``, ``item_id``, and the ids of the side tables and ``cold_items``): an integer-valued
  float (``9.0``) is the integer ``9``, and a string ``"9.0"`` (``-?digits.0+``) is the string ``"9"``,
  so a float round trip of an integer id never makes two items; fractional or non-finite float ids are
  refused. Each rewritten value of the event log is counted (``user_ids_normalized``, ``item_ids_normalized``).
- **Timestamps**: a numeric column is read in ``timestamp_unit`` (s / ms / us / ns) and floored to whole
  seconds; ``auto`` takes the unit from the magnitude of every value (below 1e11: s, 1e14: ms, 1e17: us,
  else ns) and refuses a column whose values fall in different classes. Dates and datetimes carry their
  own unit. Any unit: every time must land in [1970-01-01, 2100-01-01) UTC, or the column is refused.
- **Labels**: numbers (also numeric strings) and booleans (true = 1); anything else is refused.
- **Exact duplicate events** (rows equal in every column once ids are normalized): ``duplicates`` =
  drop (default: the first is kept, the others counted as ``duplicate_events_dropped``), keep, or error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from recsys.data.config import DuplicatePolicy, TimestampUnit
from recsys.errors import InputError

REQUIRED_EVENT_COLUMNS = ("user_id", "item_id", "timestamp")
EPOCH_END_S = 4_102_444_800
"""2100-01-01T00:00:00Z in seconds: a timestamp at or after it (or before 1970) is not a plausible event time."""
UNIT_SCALE = {TimestampUnit.s: 1, TimestampUnit.ms: 10**3, TimestampUnit.us: 10**6, TimestampUnit.ns: 10**9}
UNIT_NAME = {TimestampUnit.s: "seconds", TimestampUnit.ms: "milliseconds", TimestampUnit.us: "microseconds",
             TimestampUnit.ns: "nanoseconds"}
AUTO_BOUNDS = ((1e11, TimestampUnit.s), (1e14, TimestampUnit.ms), (1e17, TimestampUnit.us),
               (float("inf"), TimestampUnit.ns))
"""``timestamp_unit=auto``: a value below the bound (in absolute value) is of that unit. Seconds of
1970..2100 are below 4.2e9, milliseconds of 1973..2100 in [1e11, 4.2e12], and so on: the classes of
plausible epoch times never overlap, so one column of real epoch times falls in exactly one class."""
FLOAT_ID_SUFFIX = r"^-?[0-9]+\.0+$"
"""A string id that is an integer printed as a float (``"9.0"``): the ``.0`` suffix is dropped."""


class InputFileNotFound(InputError, FileNotFoundError):
    """An input file that does not exist: an operator mistake (exit 2), and still a ``FileNotFoundError``."""


def table_name(src: pl.DataFrame | str | Path, what: str, name: str | None = None) -> str:
    """How messages name a table: ``name`` if given, else the file path, else ``what`` (e.g. "event log")."""
    if name is not None:
        return name
    return what if isinstance(src, pl.DataFrame) else str(src)


def read_frame(src: pl.DataFrame | str | Path, separator: str | None = None, *, header_only: bool = False,
               string_columns: tuple[str, ...] = ()) -> pl.DataFrame:
    """A DataFrame as is, or a Parquet / CSV / TSV file (``.tsv``, ``.inter``... read tab-separated).

    CSV and TSV are read with standard ``"`` quoting, and every row takes part in inferring the column
    types (a float in the last row does not fail the read). ``header_only``: no rows, only the column
    names (cheap: the check of a column mapping before any work). ``string_columns``: CSV columns read
    as text, not inferred (ids matched against stored string ids: ``007`` stays ``"007"``).
    """
    if isinstance(src, pl.DataFrame):
        return src.clear() if header_only else src
    path = Path(src)
    if not path.is_file():
        raise InputFileNotFound(f"event/feature table {path} does not exist")
    try:
        if path.suffix == ".parquet":
            if header_only:
                return pl.DataFrame(schema=pl.read_parquet_schema(path))
            return pl.read_parquet(path)
        sep = separator or ("," if path.suffix == ".csv" else "\t")
        if header_only:  # the names only: infer_schema_length=None would scan every row even with n_rows=0
            return pl.read_csv(path, separator=sep, quote_char='"', n_rows=0, infer_schema_length=0)
        return pl.read_csv(path, separator=sep, quote_char='"', infer_schema_length=None,
                           schema_overrides={c: pl.String for c in string_columns} or None)
    except (pl.exceptions.PolarsError, OSError) as e:  # ragged rows, bad encoding, not a Parquet file...
        raise InputError(f"cannot read {path} as {'Parquet' if path.suffix == '.parquet' else 'CSV/TSV'}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def check_mapping(columns: list[str], mapping: dict[str, str], where: str, key: str) -> None:
    """Every column ``mapping`` names (``{standard name: file column}``) is in ``columns``, and no other
    column of the table already holds a standard name it would be read under.

    Raises ``InputError`` naming the table, the keys ``<key>.<field>=<column>`` at fault and the columns.
    """
    missing = {std: col for std, col in mapping.items() if col not in columns}
    if missing:
        keys = ", ".join(f"{key}.{std}={col}" for std, col in missing.items())
        raise InputError(f"{where} lacks column(s) {list(missing.values())} ({keys}; its columns: {columns}); "
                         f"it needs columns {', '.join(mapping)}: name the file's own columns with "
                         f"{key}.<field>=<column>")
    sources = set(mapping.values())
    for std, col in mapping.items():
        if col != std and std in columns and std not in sources:
            raise InputError(f"{where}: {key}.{std}={col}, but the table also has a column {std!r}: it would be "
                             f"read as two {std} columns; map {key}.{std}={std}, or rename one of them")


def apply_mapping(frame: pl.DataFrame, mapping: dict[str, str], keep: tuple[str, ...] = ()) -> pl.DataFrame:
    """``frame`` with each mapped file column renamed to its standard name (no copy of the data). A mapped
    column also named in ``keep`` (the label column, when it is also the action) stays under its own name
    too; the other file columns are untouched (a side table's other columns are its features)."""
    moved = {std: col for std, col in mapping.items() if col != std}
    if not moved:
        return frame
    drop = [col for col in set(moved.values()) if col not in keep and col not in moved]
    return frame.with_columns(pl.col(col).alias(std) for std, col in moved.items()).drop(drop)


def first_row(mask: pl.Series | np.ndarray) -> int:
    """Index of the first True of a boolean mask (the caller knows there is one)."""
    return int(np.flatnonzero(np.asarray(mask, dtype=bool))[0])


def numeric_column(values: pl.Series, where: str, hint: str = "") -> pl.Series:
    """A numeric column as is; a string column cast to Int64 (if every value is an integer) or Float64.

    Raises ``InputError`` naming the first value that is not a number, or a dtype that holds none.
    """
    if values.dtype.is_numeric():
        return values
    if values.dtype != pl.String:
        raise InputError(f"{where}: column {values.name!r} has dtype {values.dtype}; expected numbers{hint}")
    present = values.is_not_null()
    as_int = values.cast(pl.Int64, strict=False)
    if (as_int.is_not_null() == present).all():
        return as_int
    as_float = values.cast(pl.Float64, strict=False)
    bad = (as_float.is_null() & present).to_numpy()
    if bad.any():
        i = first_row(bad)
        raise InputError(f"{where}: column {values.name!r}, row {i}: {values[i]!r} is not a number{hint}")
    return as_float


def cast_ids(ids: pl.Series, dtype: pl.DataType, what: str) -> pl.Series:
    """``ids`` of a side table normalized like the log's (:func:`normalize_ids`: ``9.0`` is ``9``)
    and cast to the event log's id dtype, or an ``InputError`` saying which table."""
    ids, _ = normalize_ids(ids, what)
    try:
        return ids.cast(dtype)
    except pl.exceptions.PolarsError as e:
        raise InputError(f"{what}: column {ids.name!r} of dtype {ids.dtype} does not convert to the event log's "
                         f"{dtype} ids ({str(e).splitlines()[0]})") from e


def normalize_ids(ids: pl.Series, where: str) -> tuple[pl.Series, int]:
    """Ids with the float round trip undone (see the module docstring), and how many values changed.

    Integer ids pass as they are; integer-valued floats become Int64; strings ``"<int>.0"`` lose the
    suffix. A fractional, non-finite or out-of-int64 float id is refused (``InputError`` naming it).
    """
    if ids.dtype.is_float():
        finite = ids.is_finite().fill_null(True)
        bad = (~finite | (ids.fill_nan(0.0) != ids.fill_nan(0.0).round()).fill_null(False)
               | (ids.abs() >= 2.0**63).fill_null(False)).to_numpy()
        if bad.any():
            i = first_row(bad)
            raise InputError(f"{where}: column {ids.name!r}, row {i}: {ids[i]!r} is not an id (float ids must "
                             "be whole numbers: 9.0 is read as 9)")
        return ids.cast(pl.Int64), int(ids.is_not_null().sum())
    if ids.dtype == pl.String:
        suffixed = ids.str.contains(FLOAT_ID_SUFFIX).fill_null(False)
        n = int(suffixed.sum())
        if n:
            ids = ids.str.replace(r"\.0+$", "")
        return ids, n
    return ids, 0


def event_timestamps(ts: pl.Series, unit: TimestampUnit, where: str) -> tuple[pl.Series, TimestampUnit]:
    """Event times as int64 seconds (floored), and the unit they were read in (see the module docstring).

    Raises ``InputError`` naming the column, row and value: not a number, fractional, not finite, mixed
    magnitudes (``auto``), or outside 1970..2100.
    """
    if ts.dtype == pl.Date or isinstance(ts.dtype, pl.Datetime):
        seconds = ts.dt.epoch("s")
        _check_epoch_range(seconds.cast(pl.Float64), TimestampUnit.s, where, ts)
        return seconds.cast(pl.Int64), TimestampUnit.s
    hint = " (timestamps are numbers in timestamp_unit, or a Parquet date / timestamp column)"
    if ts.dtype == pl.Boolean:
        raise InputError(f"{where}: column {ts.name!r} has dtype {ts.dtype}; expected numbers{hint}")
    ts = numeric_column(ts, where, hint)
    as_float = ts.cast(pl.Float64)
    if ts.dtype.is_float():
        bad = (~as_float.is_finite() | (as_float != as_float.round())).to_numpy()
        if bad.any():
            i = first_row(bad)
            raise InputError(f"{where}: column {ts.name!r}, row {i}: {ts[i]!r} is not a whole number (of "
                             f"timestamp_unit={unit.value})")
    if unit == TimestampUnit.auto:
        unit = _infer_unit(as_float, where, ts.name)
    _check_epoch_range(as_float, unit, where, ts)
    return ts.cast(pl.Int64) // UNIT_SCALE[unit], unit  # floor: inside [0, 2100) so no int64 overflow


def _infer_unit(as_float: pl.Series, where: str, column: str) -> TimestampUnit:
    """The one magnitude class of every value (``AUTO_BOUNDS``), or an ``InputError`` naming two rows
    of different classes."""
    mag = as_float.abs().to_numpy()
    if mag.size == 0:
        return TimestampUnit.s
    cls = np.searchsorted(np.array([b for b, _ in AUTO_BOUNDS]), mag, side="right")
    lo, hi = int(cls.min()), int(cls.max())
    if lo != hi:
        i, j = first_row(cls == lo), first_row(cls == hi)
        raise InputError(
            f"{where}: column {column!r} mixes magnitudes under timestamp_unit=auto: row {i} = {as_float[i]:.0f} "
            f"looks like {UNIT_NAME[AUTO_BOUNDS[lo][1]]}, row {j} = {as_float[j]:.0f} like "
            f"{UNIT_NAME[AUTO_BOUNDS[hi][1]]}; fix the column or set timestamp_unit (s, ms, us, ns)")
    return AUTO_BOUNDS[lo][1]


def _check_epoch_range(as_float: pl.Series, unit: TimestampUnit, where: str, raw: pl.Series) -> None:
    """Every time in [1970-01-01, 2100-01-01) UTC, read in ``unit``, or an ``InputError`` naming the first."""
    limit = EPOCH_END_S * UNIT_SCALE[unit]
    bad = ((as_float < 0) | (as_float >= limit)).fill_null(False).to_numpy()
    if not bad.any():
        return
    i = first_row(bad)
    value = raw[i]
    guess = ""
    if isinstance(value, int | float) and value > 0:
        cls = next(u for b, u in AUTO_BOUNDS if abs(value) < b)
        if cls != unit:
            guess = f"; it looks like {UNIT_NAME[cls]} (ingest option timestamp_unit={cls.value} reads those)"
    raise InputError(f"{where}: column {raw.name!r}, row {i}: {value!r} is not a plausible event time in "
                     f"{UNIT_NAME[unit]} (1970-01-01..2100-01-01 UTC is [0, {limit}) {unit.value}){guess}")


def label_values(labels: pl.Series, where: str) -> np.ndarray:
    """A label column as float64 (NaN = missing): numbers, numeric strings, or booleans (true = 1).

    Raises ``InputError`` naming the first value that is none of these.
    """
    if labels.dtype == pl.Boolean:
        labels = labels.cast(pl.Float64)
    hint = (" (labels are 0/1, or numbers with positive_threshold; a true/false column is read as 1/0; "
            "map other values to numbers first)")
    return numeric_column(labels, where, hint).cast(pl.Float64).fill_null(float("nan")).to_numpy()


@dataclass
class CheckedEvents:
    """An event log after the checks: ids normalized, times in seconds, duplicates handled."""

    frame: pl.DataFrame
    """The events (every raw column; user_id / item_id normalized, timestamp int64 seconds)."""
    source_row: np.ndarray
    """[N] row of each kept event in the table as read (for messages after duplicates are dropped)."""
    counters: dict[str, int | str] = field(default_factory=dict)
    """duplicate_events_dropped, user_ids_normalized, item_ids_normalized, timestamp_unit."""


def check_events(raw: pl.DataFrame, where: str, *, unit: TimestampUnit, duplicates: DuplicatePolicy
                 ) -> CheckedEvents:
    """Required columns without nulls, ids normalized, times in seconds, then the duplicate policy."""
    missing = [c for c in REQUIRED_EVENT_COLUMNS if c not in raw.columns]
    if missing:
        raise InputError(f"{where} lacks column(s) {missing} (it has {raw.columns}); it needs "
                         f"{list(REQUIRED_EVENT_COLUMNS)}")
    for c in (*REQUIRED_EVENT_COLUMNS, "kind"):
        if c in raw.columns and raw[c].null_count():
            raise InputError(f"{where}: column {c!r} has {raw[c].null_count()} null value(s), first at row "
                             f"{first_row(raw[c].is_null())}")
    users, n_users = normalize_ids(raw["user_id"], where)
    items, n_items = normalize_ids(raw["item_id"], where)
    seconds, unit_used = event_timestamps(raw["timestamp"], unit, where)
    frame = raw.with_columns(users, items)
    rows = np.arange(len(frame), dtype=np.int64)
    dropped = 0
    if duplicates != DuplicatePolicy.keep and len(frame):
        first = frame.select(pl.struct(pl.all()).is_first_distinct()).to_series().to_numpy()
        if not first.all():
            if duplicates == DuplicatePolicy.error:
                _refuse_duplicate(frame, first, where)
            frame, rows, dropped = frame.filter(pl.Series(first)), rows[first], int((~first).sum())
            seconds = seconds.filter(pl.Series(first))
    frame = frame.with_columns(seconds.alias("timestamp"))
    return CheckedEvents(frame, rows, {"duplicate_events_dropped": dropped, "user_ids_normalized": n_users,
                                       "item_ids_normalized": n_items, "timestamp_unit": unit_used.value})


def _refuse_duplicate(frame: pl.DataFrame, first: np.ndarray, where: str) -> None:
    j = first_row(~first)
    row = frame.row(j)
    hashes = frame.hash_rows().to_numpy()  # candidates by hash, then compared value by value
    i = next((int(k) for k in np.flatnonzero(hashes[:j] == hashes[j]) if _same_row(frame.row(int(k)), row)),
             "an earlier one")
    raise InputError(f"{where}: row {j} repeats row {i} exactly ({dict(zip(frame.columns, row))}); "
                     f"{int((~first).sum())} exact duplicate event(s) in all. duplicates=error refuses them; "
                     "duplicates=drop keeps the first of each, duplicates=keep keeps all")


def _same_row(a: tuple, b: tuple) -> bool:
    """Row equality with NaN equal to NaN (as ``is_first_distinct`` counts it)."""
    return all(x == y or (isinstance(x, float) and isinstance(y, float) and x != x and y != y) for x, y in zip(a, b))
