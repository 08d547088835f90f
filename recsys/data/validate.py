"""Checks one Parquet row group against the :class:`DataSchema` contract on read.

Every error names the file, the row group and the column (and the row inside the
row group when one row is at fault), so a bad shard of a large file set can be found
without re-reading everything. Policies (see docs/data.md):

====================================  =====================================================
negative id                           error
id >= table size                      ``schema.oov_policy``: error, or map to id 0
NaN / Inf dense value                 error
float64 dense column                  cast to float32 (the contract's dtype); beyond float32's range: error
null anywhere                         error
empty history                         allowed
zero candidates                       error
candidate columns of unequal length   error
sequence columns of unequal length    error
history event ts >= request_ts        error (leakage guard)
history ts decreasing within a row    error (writers sort; a reader that re-sorted would
                                      hide a writer bug)
label not in {0, 1}                   error
request_id repeated in a row group    error (across row groups / files: the writer's contract, not checked)
true prob outside [0, 1]              error
====================================  =====================================================
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.types as pat

from recsys.data.jagged import jagged_from_arrow
from recsys.data.schema import OOV_ID, DataSchema
from recsys.errors import InputError


class DataValidationError(InputError):
    """A request-row file breaks the data contract; the message says where."""


def _where(file: str | Path, row_group: int, column: str, row: int | None = None) -> str:
    loc = f"{file}, row group {row_group}, column {column!r}"
    return loc if row is None else f"{loc}, row {row}"


def list_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list column as ``(offsets [N+1] int64 from 0, flat values)``."""
    j = jagged_from_arrow(col)
    return j.offsets, j.values


def _row_of(offsets: np.ndarray, flat_index: int) -> int:
    """Row that holds element ``flat_index`` of a list column with these offsets."""
    return int(np.searchsorted(offsets, flat_index, side="right") - 1)


def _expected_types(schema: DataSchema) -> dict[str, pa.DataType]:
    return {f.name: f.type for f in schema.arrow_schema()}


def _narrow_large_types(table: pa.Table, schema: DataSchema, file: str | Path, row_group: int) -> pa.Table:
    """``large_list<T>`` / ``large_string`` columns where the schema says ``list<T>`` / ``string`` cast to the schema's
    type: the same values with 64-bit offsets, as polars writes lists by default."""
    want = _expected_types(schema)
    for i, field in enumerate(table.schema):
        expected, got = want.get(field.name), field.type
        large = expected is not None and (
            (pat.is_large_list(got) and pat.is_list(expected) and got.value_type.equals(expected.value_type))
            or (pat.is_large_string(got) and pat.is_string(expected)))
        if large:
            try:
                table = table.set_column(i, field.name, table.column(i).cast(expected))
            except pa.ArrowInvalid as e:  # more elements than 32-bit offsets hold: a row group too large
                raise DataValidationError(f"{_where(file, row_group, field.name)}: {got} does not fit {expected} "
                                          f"({e}); write smaller row groups") from None
    return table


def _check_types(table: pa.Table, schema: DataSchema, file: str | Path, row_group: int) -> None:
    dense = set(schema.dense)
    for name, want in _expected_types(schema).items():
        if name not in table.column_names:
            raise DataValidationError(f"{_where(file, row_group, name)}: missing column (expected {want})")
        got = table.schema.field(name).type
        if name in dense:
            if not (pat.is_float32(got) or pat.is_float64(got)):
                raise DataValidationError(f"{_where(file, row_group, name)}: dtype {got}, expected float32 or float64")
        elif not got.equals(want):
            raise DataValidationError(f"{_where(file, row_group, name)}: dtype {got}, expected {want}")
        col = table.column(name)
        nulls = col.null_count + (pc.list_flatten(col).null_count if pat.is_list(got) else 0)
        if nulls:
            raise DataValidationError(f"{_where(file, row_group, name)}: {nulls} null value(s)")


def _check_ids(values: np.ndarray, size: int, policy: str, where: tuple[str | Path, int, str],
               row_of: Callable[[int], int]) -> np.ndarray | None:
    """Returns remapped values when the OOV policy changed something, else None; raises otherwise."""
    file, rg, col = where
    if values.size == 0:
        return None
    neg = np.flatnonzero(values < 0)
    if neg.size:
        i = int(neg[0])
        raise DataValidationError(f"{_where(file, rg, col, row_of(i))}: negative id {int(values[i])}")
    big = np.flatnonzero(values >= size)
    if not big.size:
        return None
    if policy == "error":
        i = int(big[0])
        raise DataValidationError(
            f"{_where(file, rg, col, row_of(i))}: id {int(values[i])} >= table size {size} "
            f"({big.size} such value(s); oov_policy='error')")
    out = values.copy()
    out[big] = OOV_ID
    return out


def _to_float32(vals: np.ndarray, where: tuple[str | Path, int, str]) -> np.ndarray:
    """Finite float64 dense values as float32 (round to nearest); one beyond float32's range is an error."""
    with np.errstate(over="ignore"):
        out = vals.astype(np.float32)
    over = np.flatnonzero(~np.isfinite(out))
    if over.size:
        i = int(over[0])
        raise DataValidationError(f"{_where(*where, i)}: dense value {float(vals[i])!r} is beyond the float32 range "
                                  "(dense features are float32)")
    return out


Where = tuple[str | Path, int]
"""``(file, row_group)`` of the table under check."""


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """A ``list<int64>`` column from ``offsets [N+1]`` and flat ``values``."""
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.int64()))


def _check_scalar_ids(table: pa.Table, schema: DataSchema, policy: str, at: Where) -> dict[str, pa.Array]:
    """Sparse feature ids (under the OOV policy) and ``user_id`` (non-negative); returns remapped columns."""
    file, row_group = at
    replace: dict[str, pa.Array] = {}
    for f in schema.sparse:
        vals = table.column(f.name).to_numpy()
        new = _check_ids(vals, f.num_embeddings, policy, (file, row_group, f.name), int)
        if new is not None:
            replace[f.name] = pa.array(new, pa.int64())
    uid = table.column("user_id").to_numpy()
    if uid.size and uid.min() < 0:
        i = int(np.flatnonzero(uid < 0)[0])
        raise DataValidationError(f"{_where(file, row_group, 'user_id', i)}: negative id {int(uid[i])}")
    return replace


def _check_request_ids(table: pa.Table, at: Where) -> None:
    """``request_id`` unique inside the row group (across row groups / files it is the writer's contract)."""
    file, row_group = at
    rid = table.column("request_id").to_numpy()
    if rid.size > 1:
        order = np.argsort(rid, kind="stable")
        dup = np.flatnonzero(rid[order][1:] == rid[order][:-1])
        if dup.size:
            first, again = int(order[dup[0]]), int(order[dup[0] + 1])
            raise DataValidationError(f"{_where(file, row_group, 'request_id', again)}: request_id {int(rid[again])} "
                                      f"already used by row {first} (request ids must be unique)")


def _check_dense(table: pa.Table, schema: DataSchema, at: Where) -> dict[str, pa.Array]:
    """Dense values finite; returns float64 columns cast to float32 (so every row group has one schema)."""
    file, row_group = at
    replace: dict[str, pa.Array] = {}
    for d in schema.dense:
        vals = table.column(d).to_numpy()
        bad = np.flatnonzero(~np.isfinite(vals))
        if bad.size:
            i = int(bad[0])
            raise DataValidationError(f"{_where(file, row_group, d, i)}: non-finite dense value {vals[i]}")
        if vals.dtype != np.float32:
            replace[d] = pa.array(_to_float32(vals, (file, row_group, d)), pa.float32())
    return replace


def _check_history_ts(ts: np.ndarray, ref_off: np.ndarray, request_ts: np.ndarray, ref_name: str,
                      at: Where) -> None:
    """History timestamps (flat, rows by ``ref_off [R+1]``) strictly before ``request_ts [R]`` and
    non-decreasing inside each row."""
    file, row_group = at
    lengths = np.diff(ref_off)
    late = np.flatnonzero(ts >= np.repeat(request_ts, lengths))
    if late.size:
        i = int(late[0])
        row = _row_of(ref_off, i)
        raise DataValidationError(
            f"{_where(file, row_group, ref_name, row)}: history event ts {int(ts[i])} >= request_ts "
            f"{int(request_ts[row])} (leakage: history must be strictly before the request)")
    if ts.size > 1:
        down = np.flatnonzero(ts[1:] < ts[:-1]) + 1
        # a decrease across a row boundary is fine: keep only those inside one row
        down = down[~np.isin(down, ref_off)]
        if down.size:
            raise DataValidationError(
                f"{_where(file, row_group, ref_name, _row_of(ref_off, int(down[0])))}: history timestamps "
                "not sorted oldest first")


def _check_sequence(table: pa.Table, schema: DataSchema, kind: str, policy: str,
                    at: Where) -> dict[str, pa.Array]:
    """One history kind: every field as long as its ``ts`` column per row, ids under the OOV policy,
    timestamps before the request and sorted; returns remapped columns."""
    file, row_group = at
    replace: dict[str, pa.Array] = {}
    ref_name = schema.seq_col(kind, "ts")
    ref_off, ts = list_parts(table.column(ref_name))
    for fld in schema.SEQ_FIELDS:
        name = schema.seq_col(kind, fld)
        off, vals = list_parts(table.column(name))
        if not np.array_equal(off, ref_off):
            i = int(np.flatnonzero(np.diff(off) != np.diff(ref_off))[0])
            raise DataValidationError(
                f"{_where(file, row_group, name, i)}: length {int(off[i + 1] - off[i])} != "
                f"length {int(ref_off[i + 1] - ref_off[i])} of {ref_name!r}")
        if fld == "ts":
            continue
        new = _check_ids(vals, schema.table_size(fld), policy, (file, row_group, name),
                         lambda i, o=off: _row_of(o, i))
        if new is not None:
            replace[name] = _list_array(off, new)
    _check_history_ts(ts, ref_off, table.column("request_ts").to_numpy(), ref_name, at)
    return replace


def _check_candidates(table: pa.Table, schema: DataSchema, policy: str, at: Where) -> dict[str, pa.Array]:
    """At least one candidate per row; every candidate column as long as ``cand_item_id`` per row; labels
    in {0, 1}, probabilities in [0, 1], ids under the OOV policy; returns remapped columns."""
    file, row_group = at
    replace: dict[str, pa.Array] = {}
    cand_off, _ = list_parts(table.column("cand_item_id"))
    empty = np.flatnonzero(np.diff(cand_off) == 0)
    if empty.size:
        raise DataValidationError(f"{_where(file, row_group, 'cand_item_id', int(empty[0]))}: zero candidates")
    cand_cols = [f"cand_{f}" for f in schema.CAND_ID_FIELDS] + [f"cand_label_{t}" for t in schema.tasks]
    if schema.has_true_prob:
        cand_cols += [f"cand_prob_{t}" for t in schema.tasks]
    for name in cand_cols:
        off, vals = list_parts(table.column(name))
        if not np.array_equal(off, cand_off):
            i = int(np.flatnonzero(np.diff(off) != np.diff(cand_off))[0])
            raise DataValidationError(
                f"{_where(file, row_group, name, i)}: {int(off[i + 1] - off[i])} values but "
                f"{int(cand_off[i + 1] - cand_off[i])} candidates in 'cand_item_id'")
        if name.startswith("cand_label_"):
            bad = np.flatnonzero((vals != 0) & (vals != 1))
            if bad.size:
                i = int(bad[0])
                raise DataValidationError(
                    f"{_where(file, row_group, name, _row_of(off, i))}: label {vals[i]} not in {{0, 1}}")
        elif name.startswith("cand_prob_"):
            bad = np.flatnonzero(~((vals >= 0) & (vals <= 1)))
            if bad.size:
                i = int(bad[0])
                raise DataValidationError(
                    f"{_where(file, row_group, name, _row_of(off, i))}: probability {vals[i]} not in [0, 1]")
        else:
            fld = name.removeprefix("cand_")
            new = _check_ids(vals, schema.table_size(fld), policy, (file, row_group, name),
                             lambda i, o=off: _row_of(o, i))
            if new is not None:
                replace[name] = _list_array(off, new)
    return replace


def _apply(table: pa.Table, replace: dict[str, pa.Array], schema: DataSchema) -> pa.Table:
    """``table`` with the ``replace`` columns swapped in, cast to exactly ``schema.arrow_schema()``."""
    n = table.num_rows
    for name, arr in replace.items():
        table = table.set_column(table.column_names.index(name), name, arr)
    target = schema.arrow_schema()
    if not table.schema.equals(target):  # e.g. fields a writer declared non-nullable: concat needs one schema
        table = table.cast(target)
    assert table.num_rows == n
    return table


def validate_table(table: pa.Table, schema: DataSchema, file: str | Path, row_group: int) -> pa.Table:
    """Checks a row group read from ``file`` against ``schema``; returns it (ids remapped under ``oov``).

    Raises :class:`DataValidationError` naming file, row group, column (and row) on the
    first violation. Columns not in the schema are dropped from the returned table, and float64 dense
    columns are cast to float32 and ``large_list`` / ``large_string`` columns (polars' default) to ``list`` / ``string``:
    the returned table has exactly ``schema.arrow_schema()``, so row groups of files written either way concatenate. Checks run in this order: types and nulls, sparse ids
    and ``user_id``, ``request_id`` uniqueness, dense values, each history kind, candidates.
    """
    table = _narrow_large_types(table, schema, file, row_group)
    _check_types(table, schema, file, row_group)
    table = table.select([f.name for f in schema.arrow_schema()])
    policy = str(getattr(schema.oov_policy, "value", schema.oov_policy))
    at: Where = (file, row_group)
    replace = _check_scalar_ids(table, schema, policy, at)
    _check_request_ids(table, at)
    replace.update(_check_dense(table, schema, at))
    for kind in schema.sequences:
        replace.update(_check_sequence(table, schema, kind, policy, at))
    replace.update(_check_candidates(table, schema, policy, at))
    return _apply(table, replace, schema)
