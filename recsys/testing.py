"""Random `RequestBatch`es for tests and benchmarks (no Parquet involved).

The loader tests pin Parquet -> batch; model tests and kernel benches only need
well-formed batches with controlled jagged lengths, which this builds directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import RequestBatch
from recsys.data.jagged import lengths_to_offsets
from recsys.data.schema import DataSchema, SparseFeature


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op torch threads, restoring the previous count after. Tests of tiny
    models use 1: on a loaded 2-core machine every parallel op waits for a descheduled thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_schema(kinds: Sequence[str] = ("click", "like"), tasks: Sequence[str] = ("click", "like"),
                n_dense: int = 2, n_sparse: int = 2) -> DataSchema:
    return DataSchema(
        sparse=[SparseFeature(f"u_feat{i}", 7 + i) for i in range(n_sparse)],
        dense=[f"dense{i}" for i in range(n_dense)],
        sequences=list(kinds), tasks=list(tasks), num_items=50, num_categories=6, num_actions=4)


def random_request_batch(schema: DataSchema, history_lengths: Sequence[Sequence[int]] | Sequence[int],
                         candidates: Sequence[int], *, seed: int = 0) -> RequestBatch:
    """A batch with the given jagged shape.

    ``history_lengths``: per request, either one length (used for every kind) or one per
    kind; ``candidates``: C_b per request (>= 1).
    """
    g = torch.Generator().manual_seed(seed)
    b = len(candidates)
    per_kind = [[int(x)] * len(schema.sequences) if isinstance(x, int) else [int(v) for v in x]
                for x in history_lengths]
    request_ts = torch.full((b,), 10**6, dtype=torch.int64) + torch.randint(0, 1000, (b,), generator=g)

    def ids(n: int, size: int) -> torch.Tensor:
        return torch.randint(1, size, (n,), generator=g)

    seq_keys, seq_vals, seq_lens, ts_vals, ts_lens = [], [], [], [], []
    for ki, kind in enumerate(schema.sequences):
        lens = torch.tensor([p[ki] for p in per_kind], dtype=torch.int64)
        n = int(lens.sum())
        for fld in ("item_id", "category", "action"):
            seq_keys.append(f"{kind}.{fld}")
            seq_vals.append(ids(n, schema.table_size(fld)))
            seq_lens.append(lens)
        gaps = [torch.sort(torch.randint(1, 10**5, (int(ln),), generator=g), descending=True).values for ln in lens]
        ts_vals.append(torch.cat([request_ts[i] - gp for i, gp in enumerate(gaps)]) if n else torch.zeros(0, dtype=torch.int64))
        ts_lens.append(lens)
    cand_lens = torch.tensor(list(candidates), dtype=torch.int64)
    c = int(cand_lens.sum())
    return RequestBatch(
        request_id=torch.arange(b, dtype=torch.int64),
        user_id=torch.arange(b, dtype=torch.int64) + 100,
        request_ts=request_ts,
        sparse=KeyedJaggedTensor(
            keys=[f.name for f in schema.sparse],
            values=torch.cat([ids(b, f.num_embeddings) for f in schema.sparse]) if schema.sparse
            else torch.zeros(0, dtype=torch.int64),
            lengths=torch.ones(b * len(schema.sparse), dtype=torch.int32)),
        dense=torch.randn(b, len(schema.dense), generator=g),
        seq=KeyedJaggedTensor(keys=seq_keys, values=torch.cat(seq_vals), lengths=torch.cat(seq_lens).int()),
        seq_ts=KeyedJaggedTensor(keys=list(schema.sequences), values=torch.cat(ts_vals), lengths=torch.cat(ts_lens).int()),
        cand=KeyedJaggedTensor(keys=["item_id", "category"],
                               values=torch.cat([ids(c, schema.num_items), ids(c, schema.num_categories)]),
                               lengths=torch.cat([cand_lens, cand_lens]).int()),
        cand_offsets=lengths_to_offsets(cand_lens),
        labels=(torch.rand(c, len(schema.tasks), generator=g) < 0.3).float(),
    )
