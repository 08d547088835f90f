"""Hypothesis strategies and slow reference code shared by the fuzz tests (imported by name).

Example counts: ``RECSYS_FUZZ_EXAMPLES`` (default 25 per test in CI); a long local run::

    RECSYS_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest -q -p no:cacheprovider tests/reliability -k fuzz
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from recsys.data.jagged import Jagged
from recsys.data.parquet_io import to_arrow
from recsys.data.schema import DataSchema, SparseFeature

EXAMPLES = int(os.environ.get("RECSYS_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

# names that are legal but awkward: unicode, underscores, spaces, digits
NAME = st.text(alphabet="aé中_x1 ", min_size=1, max_size=4)  # "." and "" are refused by DataSchema (tested)
I64 = st.integers(-(2**63), 2**63 - 1)


@st.composite
def schemas(draw) -> DataSchema:
    kinds = draw(st.lists(NAME, min_size=1, max_size=3, unique=True))
    tasks = draw(st.lists(NAME, min_size=1, max_size=2, unique=True))
    feats = draw(st.lists(NAME.map(lambda s: "u" + s), min_size=0, max_size=3, unique=True))
    n_sparse = draw(st.integers(0, len(feats)))
    return DataSchema(
        sparse=[SparseFeature(f, draw(st.integers(2, 9))) for f in feats[:n_sparse]], dense=feats[n_sparse:],
        sequences=kinds, tasks=tasks, num_items=draw(st.integers(2, 60)),
        num_categories=draw(st.integers(2, 6)), num_actions=draw(st.integers(2, 5)),
        has_true_prob=draw(st.booleans()))


@st.composite
def request_columns(draw, schema: DataSchema, min_rows: int = 1, max_rows: int = 7) -> dict:
    """Valid request columns of ``schema``: empty histories, length-1 rows, one candidate, huge ids and times."""
    n = draw(st.integers(min_rows, max_rows))
    rid0 = draw(st.integers(-(2**62), 2**62))
    ts_lo = draw(st.sampled_from([0, -(2**40), 2**40, 1_700_000_000]))
    cols: dict = {
        "request_id": rid0 + np.array(draw(st.permutations(range(n))), dtype=np.int64),
        "user_id": np.array(draw(st.lists(st.sampled_from([0, 1, 7, 2**62]), min_size=n, max_size=n)), np.int64),
        "request_ts": np.array(draw(st.lists(st.integers(ts_lo + 1, ts_lo + 10**6), min_size=n, max_size=n)), np.int64),
    }
    for f in schema.sparse:
        cols[f.name] = np.array(draw(st.lists(st.integers(0, f.num_embeddings - 1), min_size=n, max_size=n)), np.int64)
    for d in schema.dense:
        cols[d] = np.array(draw(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=n, max_size=n)), np.float32)
    for kind in schema.sequences:
        lens = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
        ts = [sorted(draw(st.lists(st.integers(ts_lo - 10**6, int(cols["request_ts"][r]) - 1), min_size=k, max_size=k)))
              for r, k in enumerate(lens)]
        lengths = np.array(lens, np.int64)
        cols[schema.seq_col(kind, "ts")] = Jagged.from_lengths(np.array(sum(ts, []), np.int64), lengths)
        for fld in ("item_id", "category", "action"):
            vals = draw(st.lists(st.integers(0, schema.table_size(fld) - 1), min_size=int(lengths.sum()),
                                 max_size=int(lengths.sum())))
            cols[schema.seq_col(kind, fld)] = Jagged.from_lengths(np.array(vals, np.int64), lengths)
    c_lens = np.array(draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)), np.int64)
    total = int(c_lens.sum())
    for fld in schema.CAND_ID_FIELDS:
        vals = draw(st.lists(st.integers(1 if fld == "item_id" else 0, schema.table_size(fld) - 1), min_size=total,
                             max_size=total))
        cols[f"cand_{fld}"] = Jagged.from_lengths(np.array(vals, np.int64), c_lens)
    for t in schema.tasks:
        cols[f"cand_label_{t}"] = Jagged.from_lengths(
            np.array(draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=total, max_size=total)), np.float32), c_lens)
        if schema.has_true_prob:
            cols[f"cand_prob_{t}"] = Jagged.from_lengths(
                np.array(draw(st.lists(st.floats(0, 1, width=32), min_size=total, max_size=total)), np.float32), c_lens)
    return cols


@st.composite
def valid_tables(draw, min_rows: int = 1, max_rows: int = 7) -> tuple[DataSchema, pa.Table]:
    schema = draw(schemas())
    return schema, to_arrow(draw(request_columns(schema, min_rows, max_rows)), schema)


def rows_of(table: pa.Table) -> list[dict]:
    """The table as Python rows (the slow, obvious view the references work on)."""
    return table.to_pylist()


def reference_batch(rows: list[dict], schema: DataSchema, max_len: int) -> dict[str, list]:
    """What a batch of these rows must hold, computed row by row in plain Python."""
    out: dict[str, list] = {"request_id": [], "user_id": [], "request_ts": [], "dense": [], "cand_lengths": [],
                            "cand_item_id": [], "cand_category": [], "labels": []}
    for f in schema.sparse:
        out[f"sparse.{f.name}"] = [r[f.name] for r in rows]
    for kind in schema.sequences:
        for fld in ("item_id", "category", "action", "ts"):
            out[f"{kind}.{fld}"] = []
            out[f"{kind}.{fld}.lengths"] = []
    for r in rows:
        for k in ("request_id", "user_id", "request_ts"):
            out[k].append(r[k])
        out["dense"].append([float(np.float32(r[d])) for d in schema.dense])
        for kind in schema.sequences:
            for fld in ("item_id", "category", "action", "ts"):
                events = r[schema.seq_col(kind, fld)]
                kept = events[-max_len:] if len(events) > max_len else events
                out[f"{kind}.{fld}"] += kept
                out[f"{kind}.{fld}.lengths"].append(len(kept))
        out["cand_lengths"].append(len(r["cand_item_id"]))
        out["cand_item_id"] += r["cand_item_id"]
        out["cand_category"] += r["cand_category"]
        out["labels"] += [list(x) for x in zip(*[r[f"cand_label_{t}"] for t in schema.tasks])]
    return out


def assert_batch_matches(batch, ref: dict[str, list], schema: DataSchema) -> None:
    """A RequestBatch equals the reference (exactly: ids, lengths, order, labels, dense values)."""
    assert batch.request_id.tolist() == ref["request_id"]
    assert batch.user_id.tolist() == ref["user_id"]
    assert batch.request_ts.tolist() == ref["request_ts"]
    b = len(ref["request_id"])
    assert tuple(batch.dense.shape) == (b, len(schema.dense))
    assert batch.dense.tolist() == ref["dense"]
    sparse = batch.sparse.to_dict() if schema.sparse else {}
    for f in schema.sparse:
        assert sparse[f.name].values().tolist() == ref[f"sparse.{f.name}"]
    seq, seq_ts = batch.seq.to_dict(), batch.seq_ts.to_dict()
    for kind in schema.sequences:
        for fld in ("item_id", "category", "action"):
            jt = seq[f"{kind}.{fld}"]
            assert jt.values().tolist() == ref[f"{kind}.{fld}"], (kind, fld)
            assert jt.lengths().tolist() == ref[f"{kind}.{fld}.lengths"], (kind, fld)
        assert seq_ts[kind].values().tolist() == ref[f"{kind}.ts"]
        assert seq_ts[kind].lengths().tolist() == ref[f"{kind}.ts.lengths"]
    cand = batch.cand.to_dict()
    assert cand["item_id"].values().tolist() == ref["cand_item_id"]
    assert cand["category"].values().tolist() == ref["cand_category"]
    assert batch.cand_offsets.tolist() == np.concatenate([[0], np.cumsum(ref["cand_lengths"])]).tolist()
    assert batch.labels.tolist() == ref["labels"]
