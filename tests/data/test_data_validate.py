"""Bad input: one test per policy; every error names the file, the row group and the column."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.data.config import LoaderConfig
from recsys.data.loader import RequestLoader
from recsys.data.schema import DataSchema
from recsys.data.validate import DataValidationError

ROWS, GROUP = 20, 10  # the rows edited below live in row group 1


def set_row(table: pa.Table, column: str, row: int, value: object) -> pa.Table:
    values = table[column].to_pylist()
    values[row] = value
    i = table.column_names.index(column)
    return table.set_column(i, column, pa.array(values, table.schema.field(column).type))


def _row_with_history(table: pa.Table, kind: str = "click", start: int = GROUP) -> int:
    return next(r for r in range(start, ROWS) if len(table[f"seq_{kind}_ts"][r].as_py()) >= 2)


def write_bad(tmp_path, prepared, edit: Callable[[pa.Table], pa.Table]):
    table = pq.read_table(prepared.splits["train"][0]).slice(0, ROWS)
    path = tmp_path / "bad.parquet"
    pq.write_table(edit(table), path, row_group_size=GROUP)
    return path


def read_all(path, schema: DataSchema) -> list:
    return list(RequestLoader([path], schema, LoaderConfig(batch_size=8, max_len=1000)))


def expect_error(tmp_path, prepared, edit, column: str, row_group: int = 1, match: str = "",
                 schema: DataSchema | None = None) -> str:
    path = write_bad(tmp_path, prepared, edit)
    with pytest.raises(DataValidationError) as err:
        read_all(path, schema or prepared.schema)
    msg = str(err.value)
    assert str(path) in msg and f"row group {row_group}" in msg and repr(column) in msg, msg
    assert match in msg, msg
    return msg


def test_missing_column(tmp_path, tiny_prepared):
    expect_error(tmp_path, tiny_prepared, lambda t: t.drop_columns(["cand_category"]), "cand_category",
                 row_group=0, match="missing column")


def test_wrong_dtype(tmp_path, tiny_prepared):
    def edit(t):
        i = t.column_names.index("seq_like_item_id")
        return t.set_column(i, "seq_like_item_id", t["seq_like_item_id"].cast(pa.list_(pa.int32())))
    expect_error(tmp_path, tiny_prepared, edit, "seq_like_item_id", row_group=0, match="dtype")


def test_dense_accepts_float64(tmp_path, tiny_prepared):
    def edit(t):
        i = t.column_names.index("activity")
        return t.set_column(i, "activity", t["activity"].cast(pa.float64()))
    batches = read_all(write_bad(tmp_path, tiny_prepared, edit), tiny_prepared.schema)
    assert sum(b.num_requests for b in batches) == ROWS


def test_a_file_written_by_polars_reads_like_the_pyarrow_one(tmp_path, tiny_prepared):
    """polars writes lists as ``large_list`` (64-bit offsets): same values, accepted, same batches."""
    import polars as pl

    table = pq.read_table(tiny_prepared.splits["train"][0]).slice(0, ROWS)
    path = tmp_path / "polars.parquet"
    pl.from_arrow(table).write_parquet(path, row_group_size=GROUP)
    assert pa.types.is_large_list(pq.read_schema(path).field("seq_click_item_id").type)  # the case under test
    got, want = read_all(path, tiny_prepared.schema), read_all(write_bad(tmp_path, tiny_prepared, lambda t: t),
                                                               tiny_prepared.schema)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.sizes == b.sizes and torch.equal(a.labels, b.labels) and torch.equal(a.cand_offsets, b.cand_offsets)
        for key in b.id_features.keys():
            assert torch.equal(a.id_features[key].values(), b.id_features[key].values()), key


def test_negative_id(tmp_path, tiny_prepared):
    def edit(t):
        r = _row_with_history(t)
        items = t["seq_click_item_id"][r].as_py()
        return set_row(t, "seq_click_item_id", r, [-3] + items[1:])
    expect_error(tmp_path, tiny_prepared, edit, "seq_click_item_id", match="negative id -3")


def test_id_beyond_table_error_policy(tmp_path, tiny_prepared):
    big = tiny_prepared.schema.num_items + 5
    edit = lambda t: set_row(t, "cand_item_id", 13, [big] + t["cand_item_id"][13].as_py()[1:])  # noqa: E731
    msg = expect_error(tmp_path, tiny_prepared, edit, "cand_item_id", match=f"id {big} >= table size")
    assert "row 3" in msg  # row 13 of the file = row 3 of row group 1


def test_id_beyond_table_oov_policy(tmp_path, tiny_prepared):
    big = tiny_prepared.schema.num_items + 5
    path = write_bad(tmp_path, tiny_prepared,
                     lambda t: set_row(t, "cand_item_id", 13, [big] + t["cand_item_id"][13].as_py()[1:]))
    schema = dataclasses.replace(tiny_prepared.schema, oov_policy="oov")
    rows = pq.read_table(path)["request_id"].to_pylist()
    batches = read_all(path, schema)
    items = {rid: c for bb in batches for rid, c in zip(bb.request_id.tolist(), bb.cand["item_id"].to_dense())}
    assert items[rows[13]][0].item() == 0
    assert int(items[rows[12]][0]) != 0


def test_nan_dense(tmp_path, tiny_prepared):
    expect_error(tmp_path, tiny_prepared, lambda t: set_row(t, "recent_activity", 11, float("nan")),
                 "recent_activity", match="non-finite")


def test_empty_history_is_allowed(tmp_path, tiny_prepared):
    def edit(t):
        for kind in tiny_prepared.schema.sequences:
            for fld in DataSchema.SEQ_FIELDS:
                t = set_row(t, f"seq_{kind}_{fld}", 12, [])
        return t
    path = write_bad(tmp_path, tiny_prepared, edit)
    rid = pq.read_table(path)["request_id"][12].as_py()
    for b in read_all(path, tiny_prepared.schema):
        if rid in b.request_id.tolist():
            j = b.request_id.tolist().index(rid)
            assert all(b.seq[k].lengths()[j] == 0 for k in b.seq.keys())


def test_zero_candidates(tmp_path, tiny_prepared):
    def edit(t):
        for c in [c for c in t.column_names if c.startswith("cand_")]:
            t = set_row(t, c, 14, [])
        return t
    expect_error(tmp_path, tiny_prepared, edit, "cand_item_id", match="zero candidates")


def test_mismatched_candidate_lengths(tmp_path, tiny_prepared):
    edit = lambda t: set_row(t, "cand_label_like", 15, t["cand_label_like"][15].as_py()[:-1])  # noqa: E731
    expect_error(tmp_path, tiny_prepared, edit, "cand_label_like", match="candidates")


def test_history_at_or_after_request_time(tmp_path, tiny_prepared):
    def edit(t):
        r = _row_with_history(t)
        ts = t["seq_click_ts"][r].as_py()
        return set_row(t, "seq_click_ts", r, ts[:-1] + [t["request_ts"][r].as_py()])
    expect_error(tmp_path, tiny_prepared, edit, "seq_click_ts", match="leakage")


def test_unsorted_history(tmp_path, tiny_prepared):
    def edit(t):
        r = next(r for r in range(GROUP, ROWS) if len(set(t["seq_click_ts"][r].as_py())) >= 2)
        ts = t["seq_click_ts"][r].as_py()
        return set_row(t, "seq_click_ts", r, ts[::-1])
    expect_error(tmp_path, tiny_prepared, edit, "seq_click_ts", match="not sorted")


def test_null_inside_a_list(tmp_path, tiny_prepared):
    edit = lambda t: set_row(t, "cand_category", 16, [None] + t["cand_category"][16].as_py()[1:])  # noqa: E731
    expect_error(tmp_path, tiny_prepared, edit, "cand_category", match="null")
