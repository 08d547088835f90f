"""Fuzz: one hostile change to a valid row group (dtype, null, negative / huge id, leakage, unsorted history,
length mismatch, zero candidates, bad label, NaN, duplicated request id...) -> a DataValidationError naming the
column, also when read through the Parquet loader; benign changes (extra column, OOV under ``oov``) read back
exactly as the reference says."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fuzz_helpers import FUZZ, assert_batch_matches, reference_batch, rows_of, valid_tables
from hypothesis import event, given
from hypothesis import strategies as st

from recsys.data.collate import collate
from recsys.data.config import LoaderConfig
from recsys.data.loader import RequestLoader
from recsys.data.schema import DataSchema, SparseFeature
from recsys.data.validate import DataValidationError, validate_table

MUTATIONS = ["drop", "retype", "null_scalar", "null_in_list", "negative_id", "huge_id", "leak", "unsorted",
             "length_mismatch", "zero_candidates", "bad_label", "nan_dense", "bad_prob", "duplicate_request_id",
             "extra_column"]


def replace(table: pa.Table, name: str, arr: pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, arr)


def list_col(table: pa.Table, name: str) -> list[list]:
    return table.column(name).to_pylist()


def mutate(table: pa.Table, schema: DataSchema, kind: str, data) -> tuple[pa.Table, DataSchema, str | None]:
    """Applies one mutation; returns (table, schema, column the error must name, or None when benign).

    Raises ``LookupError`` when the table has nothing to mutate that way (the example is then discarded)."""
    cols = [f.name for f in schema.arrow_schema()]
    n = table.num_rows
    row = data.draw(st.integers(0, n - 1), label="row")
    if kind == "drop":
        name = data.draw(st.sampled_from(cols))
        return table.drop_columns([name]), schema, name
    if kind == "retype":
        name = data.draw(st.sampled_from(cols))
        typ = table.schema.field(name).type
        if pa.types.is_list(typ):
            new = data.draw(st.sampled_from([pa.list_(pa.int32()), pa.list_(pa.float64()), pa.large_list(typ.value_type),
                                             pa.list_(pa.string())]))
        else:
            new = data.draw(st.sampled_from([pa.int32(), pa.string(), pa.float64(), pa.uint64()]))
        if name in schema.dense and pa.types.is_float64(new):
            return table.set_column(cols.index(name), name, table.column(name).cast(new)), schema, None  # allowed
        if name in schema.dense and pa.types.is_float32(typ) and new == pa.int32():
            new = pa.int64()
        try:
            arr = table.column(name).cast(new, safe=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            arr = pa.nulls(n, new)
        return replace(table, name, arr), schema, name
    if kind == "null_scalar":
        name = data.draw(st.sampled_from([c for c in cols if not c.startswith(("seq_", "cand_"))]))
        vals = table.column(name).to_pylist()
        vals[row] = None
        return replace(table, name, pa.array(vals, table.schema.field(name).type)), schema, name
    if kind == "null_in_list":
        name = data.draw(st.sampled_from([c for c in cols if c.startswith(("seq_", "cand_"))]))
        vals = list_col(table, name)
        if not vals[row]:
            raise LookupError
        vals[row][data.draw(st.integers(0, len(vals[row]) - 1))] = None
        return replace(table, name, pa.array(vals, table.schema.field(name).type)), schema, name
    if kind in ("negative_id", "huge_id"):
        id_cols = [f.name for f in schema.sparse] + [c for c in cols if c.startswith(("seq_", "cand_"))
                                                       and c.endswith(("item_id", "category", "action"))]
        if kind == "negative_id":
            id_cols.append("user_id")
        name = data.draw(st.sampled_from(id_cols))
        bad = data.draw(st.integers(-(2**63), -1) if kind == "negative_id" else st.integers(2**40, 2**63 - 1))
        if name.startswith(("seq_", "cand_")):
            vals = list_col(table, name)
            if not vals[row]:
                raise LookupError
            vals[row][0] = bad
        else:
            vals = table.column(name).to_pylist()
            vals[row] = bad
        table = replace(table, name, pa.array(vals, table.schema.field(name).type))
        if kind == "huge_id" and data.draw(st.booleans(), label="oov policy"):
            return table, dataclasses.replace(schema, oov_policy="oov"), None  # mapped to 0: checked below
        return table, schema, name
    if kind in ("leak", "unsorted"):
        k = data.draw(st.sampled_from(schema.sequences))
        name = schema.seq_col(k, "ts")
        vals = list_col(table, name)
        if kind == "leak":
            if not vals[row]:
                raise LookupError
            vals[row][-1] = table.column("request_ts")[row].as_py() + data.draw(st.integers(0, 10))
        else:
            if len(vals[row]) < 2 or vals[row][0] == vals[row][-1]:
                raise LookupError
            vals[row][0], vals[row][-1] = vals[row][-1], vals[row][0]
        return replace(table, name, pa.array(vals, pa.list_(pa.int64()))), schema, name
    if kind == "length_mismatch":
        name = data.draw(st.sampled_from([c for c in cols if c.startswith(("seq_", "cand_"))
                                          and c not in ("cand_item_id",) and not c.endswith("_ts")]))
        vals = list_col(table, name)
        vals[row] = vals[row] + [0]
        return replace(table, name, pa.array(vals, table.schema.field(name).type)), schema, name
    if kind == "zero_candidates":
        for name in [c for c in cols if c.startswith("cand_")]:
            vals = list_col(table, name)
            vals[row] = []
            table = replace(table, name, pa.array(vals, table.schema.field(name).type))
        return table, schema, "cand_item_id"
    if kind in ("bad_label", "bad_prob"):
        prefix = "cand_label_" if kind == "bad_label" else "cand_prob_"
        names = [c for c in cols if c.startswith(prefix)]
        if not names:
            raise LookupError
        name = data.draw(st.sampled_from(names))
        vals = list_col(table, name)
        vals[row][0] = data.draw(st.sampled_from([2.0, 0.5, -1.0, float("nan"), float("inf")]) if kind == "bad_label"
                                 else st.sampled_from([1.5, -0.1, float("nan"), float("inf")]))
        return replace(table, name, pa.array(vals, pa.list_(pa.float32()))), schema, name
    if kind == "nan_dense":
        if not schema.dense:
            raise LookupError
        name = data.draw(st.sampled_from(schema.dense))
        vals = table.column(name).to_pylist()
        vals[row] = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        return replace(table, name, pa.array(vals, pa.float32())), schema, name
    if kind == "duplicate_request_id":
        if n < 2:
            raise LookupError
        vals = table.column("request_id").to_pylist()
        other = data.draw(st.integers(0, n - 1).filter(lambda r: r != row))
        vals[other] = vals[row]
        return replace(table, "request_id", pa.array(vals, pa.int64())), schema, "request_id"
    if kind == "extra_column":
        return table.append_column("zz_extra é", pa.array(np.arange(n))), schema, None
    raise AssertionError(kind)


def oov_reference(table: pa.Table, schema: DataSchema) -> list[dict]:
    """Rows with every id >= its table size replaced by 0 (the documented ``oov`` policy), in plain Python."""
    rows = rows_of(table)
    sizes = {f.name: f.num_embeddings for f in schema.sparse}
    for k in schema.sequences:
        for fld in ("item_id", "category", "action"):
            sizes[schema.seq_col(k, fld)] = schema.table_size(fld)
    for fld in schema.CAND_ID_FIELDS:
        sizes[f"cand_{fld}"] = schema.table_size(fld)
    for r in rows:
        for name, size in sizes.items():
            v = r[name]
            r[name] = [x if x < size else 0 for x in v] if isinstance(v, list) else (v if v < size else 0)
    return rows


@FUZZ
@given(valid_tables(), st.sampled_from(MUTATIONS), st.data())
def test_fuzz_validate_names_the_column_or_reads_back_exactly(case, kind, data):
    schema, table = case
    try:
        bad, schema, column = mutate(table, schema, kind, data)
    except LookupError:
        return  # nothing of that kind to mutate in this table
    event(f"{kind}: {'benign' if column is None else 'error'}")
    if column is None:
        checked = validate_table(bad, schema, "f.parquet", 3)
        assert checked.column_names == [f.name for f in schema.arrow_schema()]
        assert_batch_matches(collate(checked, schema, 4), reference_batch(oov_reference(bad, schema), schema, 4),
                             schema)
        return
    with pytest.raises(DataValidationError) as e:
        validate_table(bad, schema, "f.parquet", 3)
    assert str(e.value).startswith(f"f.parquet, row group 3, column {column!r}"), (kind, str(e.value))


@FUZZ
@given(valid_tables(min_rows=2), st.sampled_from([m for m in MUTATIONS if m != "extra_column"]), st.data())
def test_fuzz_loader_reports_the_bad_row_group(case, kind, data):
    """The same through Parquet + RequestLoader: a clean first row group, the bad one second."""
    schema, table = case
    try:
        bad, schema, column = mutate(table, schema, kind, data)
    except LookupError:
        return
    if column is None or kind in ("drop", "retype"):
        return  # a file has one schema: covered above; here the error must point at row group 1
    half = table.num_rows // 2
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "part.parquet"
        with pq.ParquetWriter(path, bad.schema) as w:
            w.write_table(table.slice(0, half).cast(bad.schema))
            w.write_table(bad.slice(half))
        if kind == "duplicate_request_id" or bad.slice(half).equals(table.slice(half)):
            return  # the mutated row may sit in the first half; then the second row group is clean
        with pytest.raises(DataValidationError, match=rf", row group 1, column {column!r}"):
            list(RequestLoader([path], schema, LoaderConfig(batch_size=2, max_len=3)))


@pytest.mark.parametrize("name", ["", "a.b", "."])
def test_schema_refuses_names_that_break_feature_keys(name):
    with pytest.raises(ValueError, match="must be a non-empty string without '.'"):
        DataSchema(sequences=[name])
    with pytest.raises(ValueError, match="must be a non-empty string without '.'"):
        DataSchema(sparse=[SparseFeature(name, 3)])
    with pytest.raises(ValueError, match="tasks used twice"):
        DataSchema(tasks=["x", "x"])
