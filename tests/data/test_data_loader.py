"""RequestLoader: sharding covers every row once, batches equal the Parquet rows, truncation."""

from __future__ import annotations

import collections
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.data.config import LoaderConfig
from recsys.data.loader import ReadUnit, RequestLoader, plan_shards


def _ids(loader: RequestLoader) -> list[int]:
    return [int(i) for b in loader for i in b.request_id]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=7), st.integers(1, 6), st.booleans(), st.integers(0, 5))
def test_plan_shards_partitions_rows(group_rows, num_shards, shuffle, seed):
    units = [ReadUnit("f", i, 0, n) for i, n in enumerate(group_rows)]
    plan = plan_shards(units, num_shards, shuffle=shuffle, seed=seed)
    assert len(plan) == num_shards
    seen = collections.Counter((u.row_group, r) for shard in plan for u in shard for r in range(u.start, u.stop))
    assert seen == collections.Counter((i, r) for i, n in enumerate(group_rows) for r in range(n))


@pytest.mark.parametrize("row_groups_fewer_than_shards", [False, True])
def test_two_ranks_two_workers_cover_every_row_once(tiny_prepared, tmp_path, row_groups_fewer_than_shards):
    files = tiny_prepared.splits["train"]
    if row_groups_fewer_than_shards:  # rewrite as 2 row groups for 4 shards
        t = pq.read_table(files[0])
        files = [tmp_path / "two_groups.parquet"]
        pq.write_table(t, files[0], row_group_size=-(-t.num_rows // 2))
        assert pq.ParquetFile(files[0]).metadata.num_row_groups == 2
    expected = pq.read_table(files[0], columns=["request_id"])["request_id"].to_pylist()
    cfg = LoaderConfig(batch_size=7, max_len=8, num_workers=2, shuffle=True, seed=1)
    seen = []
    for rank in range(2):
        loader = RequestLoader(files, tiny_prepared.schema, cfg, rank=rank, world_size=2, epoch=3)
        ids = _ids(loader)
        assert ids, f"rank {rank} got no rows"
        assert len(list(loader)) == len(loader)
        seen += ids
    assert sorted(seen) == sorted(expected)


def test_batches_equal_parquet_rows_with_truncation(tiny_prepared):
    """Every field of every batch equals the row read independently with pyarrow; histories keep the most
    recent max_len events, oldest first."""
    schema = tiny_prepared.schema
    f = tiny_prepared.splits["train"][0]
    rows = {r["request_id"]: r for r in pq.read_table(f).to_pylist()}
    max_len = 5
    assert any(len(r["seq_click_item_id"]) > max_len for r in rows.values())  # truncation is exercised
    loader = RequestLoader([f], schema, LoaderConfig(batch_size=9, max_len=max_len))
    n = 0
    for b in loader:
        seq, seq_ts, cand, sparse = b.seq.to_dict(), b.seq_ts.to_dict(), b.cand.to_dict(), b.sparse.to_dict()
        assert b.dense.shape == (b.num_requests, len(schema.dense)) and b.dense.dtype == torch.float32
        assert b.labels.shape == (b.num_candidates, len(schema.tasks))
        for j, rid in enumerate(b.request_id.tolist()):
            row = rows[rid]
            assert b.user_id[j] == row["user_id"] and b.request_ts[j] == row["request_ts"]
            for feat in schema.sparse:
                assert sparse[feat.name].to_dense()[j].tolist() == [row[feat.name]]
            for d_i, d in enumerate(schema.dense):
                assert b.dense[j, d_i].item() == pytest.approx(row[d], rel=1e-6)
            for kind in schema.sequences:
                for fld in ("item_id", "category", "action"):
                    want = row[f"seq_{kind}_{fld}"][-max_len:]
                    assert seq[f"{kind}.{fld}"].to_dense()[j].tolist() == want
                assert seq_ts[kind].to_dense()[j].tolist() == row[f"seq_{kind}_ts"][-max_len:]
            lo, hi = b.cand_offsets[j].item(), b.cand_offsets[j + 1].item()
            assert cand["item_id"].to_dense()[j].tolist() == row["cand_item_id"]
            assert cand["category"].to_dense()[j].tolist() == row["cand_category"]
            for t_i, task in enumerate(schema.tasks):
                assert b.labels[lo:hi, t_i].tolist() == row[f"cand_label_{task}"]
                assert b.true_prob[lo:hi, t_i].tolist() == pytest.approx(row[f"cand_prob_{task}"])
            n += 1
    assert n == len(rows)


def test_jagged_not_padded_and_kjt_layout(tiny_prepared):
    f = tiny_prepared.splits["train"][0]
    b = next(iter(RequestLoader([f], tiny_prepared.schema, LoaderConfig(batch_size=4, max_len=1000))))
    lengths = b.seq["click.item_id"].lengths()
    assert lengths.dtype == torch.int32 and b.seq["click.item_id"].values().numel() == int(lengths.sum())
    assert b.cand_offsets.tolist() == [0] + np.cumsum(b.cand["item_id"].lengths().numpy()).tolist()
    assert b.sparse.lengths().eq(1).all()


def test_shuffle_depends_on_epoch_and_is_reproducible(tiny_prepared):
    files = tiny_prepared.splits["train"]
    cfg = LoaderConfig(batch_size=8, shuffle=True, seed=0)
    a0 = _ids(RequestLoader(files, tiny_prepared.schema, cfg, epoch=0))
    b0 = _ids(RequestLoader(files, tiny_prepared.schema, cfg, epoch=0))
    a1 = _ids(RequestLoader(files, tiny_prepared.schema, cfg, epoch=1))
    assert a0 == b0 and a0 != a1 and sorted(a0) == sorted(a1)
    plain = _ids(RequestLoader(files, tiny_prepared.schema, dataclasses.replace(cfg, shuffle=False)))
    assert sorted(plain) == sorted(a0)


def test_shuffle_does_not_depend_on_where_the_dataset_lives(tiny_prepared, tmp_path, monkeypatch):
    """The same files by an absolute path, by a relative one, and copied to another directory: the same order
    (the in-row-group shuffle used to be seeded by the path string, so data.root's spelling changed training)."""
    files = tiny_prepared.splits["train"]
    cfg = LoaderConfig(batch_size=8, shuffle=True, seed=3)
    want = _ids(RequestLoader([f.resolve() for f in files], tiny_prepared.schema, cfg, epoch=1))
    monkeypatch.chdir(files[0].parent.parent)
    relative = [f.resolve().relative_to(Path.cwd()) for f in files]
    assert not relative[0].is_absolute()
    assert _ids(RequestLoader(relative, tiny_prepared.schema, cfg, epoch=1)) == want
    copy = tmp_path / "elsewhere" / files[0].parent.name
    copy.mkdir(parents=True)
    moved = [Path(shutil.copy(f, copy / f.name)) for f in files]
    assert _ids(RequestLoader(moved, tiny_prepared.schema, cfg, epoch=1)) == want


def test_drop_last_and_len(tiny_prepared):
    files = tiny_prepared.splits["train"]
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    for drop_last in (False, True):
        loader = RequestLoader(files, tiny_prepared.schema, LoaderConfig(batch_size=10, drop_last=drop_last))
        batches = list(loader)
        assert len(batches) == len(loader) == (n // 10 if drop_last else -(-n // 10))
        assert all(b.num_requests == 10 for b in batches[:-1])


def _bucket(gap: int, buckets: int) -> int:
    """Slow obvious log2 bucket: floor(log2(gap + 1)) + 1 by integer bit length, clipped to 1..buckets-1."""
    return min(max((max(gap, 0) + 1).bit_length(), 1), buckets - 1)


@pytest.mark.parametrize("buckets", [32, 5])
def test_id_features_and_sizes_equal_the_rows(tiny_prepared, buckets):
    """Workers build the model's id features (time-gap and recency buckets included) and the Python sizes;
    both equal a row-by-row reference and the batch's own derivation."""
    from recsys.data.batch import BatchSizes, derive_id_features

    schema = tiny_prepared.schema
    f = tiny_prepared.splits["train"][0]
    rows = {r["request_id"]: r for r in pq.read_table(f).to_pylist()}
    max_len, n = 4, 0
    loader = RequestLoader([f], schema, LoaderConfig(batch_size=9, max_len=max_len, num_workers=2),
                           time_gap_buckets=buckets)
    for b in loader:
        feats = b.id_features.to_dict()
        assert b.time_gap_buckets == buckets
        for j, rid in enumerate(b.request_id.tolist()):
            row, newest = rows[rid], None
            for kind in schema.sequences:
                ts = row[f"seq_{kind}_ts"][-max_len:]
                want = [0] + [_bucket(t1 - t0, buckets) for t0, t1 in zip(ts, ts[1:])] if ts else []
                assert feats[f"{kind}.time_gap"].to_dense()[j].tolist() == want
                for fld in ("item_id", "category", "action"):
                    assert feats[f"{kind}.{fld}"].to_dense()[j].tolist() == row[f"seq_{kind}_{fld}"][-max_len:]
                assert b.sizes.seq_lengths[kind][j] == len(ts)
                newest = max([newest, *ts[-1:]], key=lambda t: -1 if t is None else t)
            recency = 0 if newest is None else _bucket(row["request_ts"] - newest, buckets)
            assert feats["req.recency"].to_dense()[j].tolist() == [recency]
            assert feats["cand.item_id"].to_dense()[j].tolist() == row["cand_item_id"]
            assert b.sizes.cand_counts[j] == len(row["cand_item_id"])
            n += 1
        derived = derive_id_features(b.seq, b.seq_ts, b.cand, b.request_ts, buckets)
        assert derived.keys() == b.id_features.keys()
        assert torch.equal(derived.values(), b.id_features.values())
        assert torch.equal(derived.lengths(), b.id_features.lengths())
        assert BatchSizes.of(b.seq_ts, b.cand_offsets) == b.sizes
    assert n == len(rows)
