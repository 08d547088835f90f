"""Arrow request rows (already validated) -> :class:`RequestBatch`.

Two steps, so DataLoader workers ship plain numpy arrays (pickled through a pipe,
one copy) instead of a dozen torch tensors (each moved to its own shared-memory
segment, which on 2 cores cost more than the collation itself):

1. :func:`collate_arrays` (in the worker): truncate, gather, concatenate, bucket the time gaps
   and build the id features the model's tables read (``recsys.data.id_features``), count the
   sizes (:class:`~recsys.data.batch.BatchSizes`) -> :class:`BatchArrays`.
2. :meth:`BatchArrays.to_batch` (in the consumer): zero-copy ``torch.from_numpy`` + KJT construction
   (with ``length_per_key`` given, so no KJT ever reads its lengths back).

Sequences are truncated to the ``max_len`` most recent events per kind and stay
jagged: a batch's tensors are as long as its own histories, never padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import BatchSizes, RequestBatch
from recsys.data.id_features import TIME_GAP_BUCKETS, build_id_features
from recsys.data.jagged import jagged_from_arrow, offsets_from_lengths, range_index
from recsys.data.schema import DataSchema


@dataclass
class KeyedArrays:
    """A key-major KJT as numpy: ``values`` of key 0 for all rows, then key 1, ...; ``lengths [K * B]``."""

    keys: list[str]
    values: np.ndarray
    """[sum of lengths] int64."""
    lengths: np.ndarray
    """[K * B] int32."""

    def to_kjt(self) -> KeyedJaggedTensor:
        if not self.keys:
            return KeyedJaggedTensor(keys=[], values=torch.from_numpy(self.values),
                                     lengths=torch.from_numpy(self.lengths))
        per_key = self.lengths.reshape(len(self.keys), -1).sum(1, dtype=np.int64)
        return KeyedJaggedTensor(keys=self.keys, values=torch.from_numpy(self.values),
                                 lengths=torch.from_numpy(self.lengths), stride=len(self.lengths) // len(self.keys),
                                 length_per_key=per_key.tolist())


def _keyed(keys: list[str], values: list[np.ndarray], lengths: list[np.ndarray]) -> KeyedArrays:
    if not keys:
        return KeyedArrays([], np.zeros(0, np.int64), np.zeros(0, np.int32))
    return KeyedArrays(keys, np.concatenate(values).astype(np.int64, copy=False),
                       np.concatenate(lengths).astype(np.int32))


@dataclass
class BatchArrays:
    """Everything of a :class:`RequestBatch`, as writable numpy arrays (see ``batch.py`` for shapes)."""

    request_id: np.ndarray
    user_id: np.ndarray
    request_ts: np.ndarray
    sparse: KeyedArrays
    dense: np.ndarray
    seq: KeyedArrays
    seq_ts: KeyedArrays
    cand: KeyedArrays
    cand_offsets: np.ndarray
    labels: np.ndarray
    true_prob: np.ndarray | None
    long_seq: KeyedArrays | None
    """Long history (``long_max_len > 0``): see ``RequestBatch.long_seq``."""
    id_features: KeyedArrays
    """See ``RequestBatch.id_features``."""
    sizes: BatchSizes
    time_gap_buckets: int

    def to_batch(self) -> RequestBatch:
        return RequestBatch(
            request_id=torch.from_numpy(self.request_id), user_id=torch.from_numpy(self.user_id),
            request_ts=torch.from_numpy(self.request_ts), sparse=self.sparse.to_kjt(),
            dense=torch.from_numpy(self.dense), seq=self.seq.to_kjt(), seq_ts=self.seq_ts.to_kjt(),
            cand=self.cand.to_kjt(), cand_offsets=torch.from_numpy(self.cand_offsets),
            labels=torch.from_numpy(self.labels),
            true_prob=None if self.true_prob is None else torch.from_numpy(self.true_prob),
            long_seq=None if self.long_seq is None else self.long_seq.to_kjt(),
            prebuilt=(self.id_features.to_kjt(), self.sizes), time_gap_buckets=self.time_gap_buckets)


def _scalar(table: pa.Table, name: str, dtype: type) -> np.ndarray:
    return np.array(table.column(name).to_numpy(), dtype=dtype)  # a writable copy


LONG_KEYS = ("item_id", "category", "action", "ts", "kind", "in_window")
"""Keys of ``RequestBatch.long_seq``."""


def long_history_arrays(table: pa.Table, schema: DataSchema, max_len: int, long_max_len: int) -> KeyedArrays:
    """Each row's last ``long_max_len`` events per kind, kind-major, as one jagged row (see
    ``RequestBatch.long_seq``); ``in_window`` marks the last ``max_len`` of each kind (the S tokens).

    Jagged throughout: the arrays are as long as the batch's own histories (100k events cost
    100k entries, not ``B x 100k``).
    """
    b = table.num_rows
    parts: dict[str, list[np.ndarray]] = {k: [] for k in LONG_KEYS}
    owner_parts, lens = [], np.zeros(b, dtype=np.int64)
    for ki, kind in enumerate(schema.sequences):
        ts = jagged_from_arrow(table.column(schema.seq_col(kind, "ts")))
        keep = np.minimum(ts.lengths, long_max_len)
        index, _ = range_index(ts.offsets[1:] - keep, keep)
        for fld in ("item_id", "category", "action"):
            parts[fld].append(jagged_from_arrow(table.column(schema.seq_col(kind, fld))).values[index])
        parts["ts"].append(ts.values[index])
        pos_from_end = np.repeat(ts.offsets[1:], keep) - 1 - index  # 0 = newest event of its kind
        parts["in_window"].append((pos_from_end < max_len).astype(np.int64))
        parts["kind"].append(np.full(len(index), ki, dtype=np.int64))
        owner_parts.append(np.repeat(np.arange(b), keep))
        lens += keep
    order = np.argsort(np.concatenate(owner_parts), kind="stable")  # request-major, kinds in schema order
    values = [np.concatenate(parts[k]).astype(np.int64, copy=False)[order] for k in LONG_KEYS]
    return _keyed(list(LONG_KEYS), values, [lens.astype(np.int32)] * len(LONG_KEYS))


def _id_feature_arrays(kinds: list[str], seq: KeyedArrays, ts: KeyedArrays, cand_item: np.ndarray,
                       cand_cat: np.ndarray, c_len: np.ndarray, request_ts: np.ndarray, buckets: int) -> KeyedArrays:
    """``RequestBatch.id_features`` as numpy, through the one torch implementation (``build_id_features``)."""
    def t(a: np.ndarray) -> torch.Tensor:  # zero-copy unless Arrow handed a read-only buffer
        return torch.from_numpy(np.require(a, requirements="W"))

    b = len(c_len)
    seq_vals = dict(zip(seq.keys, np.split(seq.values, np.cumsum(seq.lengths.reshape(-1, b).sum(1))[:-1])))
    ts_vals = np.split(ts.values, np.cumsum(ts.lengths.reshape(-1, b).sum(1))[:-1]) if kinds else []
    lens = {k: t(ts.lengths[i * b:(i + 1) * b]) for i, k in enumerate(kinds)}
    keys, values, lengths = build_id_features(
        kinds, {k: t(v) for k, v in seq_vals.items()}, lens, {k: t(v) for k, v in zip(kinds, ts_vals)},
        {"item_id": t(cand_item), "category": t(cand_cat)}, t(c_len.astype(np.int32)), t(request_ts), buckets)
    return _keyed(keys, [v.numpy() for v in values], [ln.numpy() for ln in lengths])


def _history_arrays(table: pa.Table, schema: DataSchema, max_len: int) -> tuple[KeyedArrays, KeyedArrays]:
    """(``seq``, ``seq_ts``) of ``RequestBatch``: each kind's last ``max_len`` events per row."""
    seq_keys, seq_vals, seq_lens, ts_vals, ts_lens = [], [], [], [], []
    for kind in schema.sequences:
        ts = jagged_from_arrow(table.column(schema.seq_col(kind, "ts")))
        keep = np.minimum(ts.lengths, max_len)
        index, _ = range_index(ts.offsets[1:] - keep, keep)  # the last `keep` events of each row, in order
        for fld in ("item_id", "category", "action"):
            seq_keys.append(f"{kind}.{fld}")
            seq_vals.append(jagged_from_arrow(table.column(schema.seq_col(kind, fld))).values[index])
            seq_lens.append(keep)
        ts_vals.append(ts.values[index])
        ts_lens.append(keep)
    return _keyed(seq_keys, seq_vals, seq_lens), _keyed(list(schema.sequences), ts_vals, ts_lens)


def collate_arrays(table: pa.Table, schema: DataSchema, max_len: int, long_max_len: int = 0,
                   time_gap_buckets: int = TIME_GAP_BUCKETS) -> BatchArrays:
    """``B`` rows of a validated table -> :class:`BatchArrays` (histories cut to the last ``max_len``;
    ``long_max_len > 0`` also attaches the long history, see :func:`long_history_arrays`; time gaps
    bucketed into ``time_gap_buckets``, which must equal the model's ``time_gap_buckets``)."""
    if long_max_len and long_max_len < max_len:
        raise ValueError(f"long_max_len ({long_max_len}) must be 0 (off) or >= max_len ({max_len})")
    if time_gap_buckets < 2:
        raise ValueError(f"time_gap_buckets must be >= 2, got {time_gap_buckets}")
    b = table.num_rows
    col = table.column
    ones = np.ones(b, dtype=np.int32)
    sparse = _keyed([f.name for f in schema.sparse], [col(f.name).to_numpy() for f in schema.sparse],
                    [ones] * len(schema.sparse))
    if schema.dense:
        dense = np.stack([col(d).to_numpy().astype(np.float32) for d in schema.dense], axis=1)  # [B, n_dense]
    else:
        dense = np.zeros((b, 0), dtype=np.float32)
    seq, seq_ts = _history_arrays(table, schema, max_len)
    cand_item = jagged_from_arrow(col("cand_item_id"))
    cand_cat = jagged_from_arrow(col("cand_category"))
    c_len = cand_item.lengths
    labels = np.stack([jagged_from_arrow(col(f"cand_label_{t}")).values for t in schema.tasks], axis=1)  # [sum C, T]
    true_prob = None
    if schema.has_true_prob:
        true_prob = np.stack([jagged_from_arrow(col(f"cand_prob_{t}")).values for t in schema.tasks], axis=1)
    request_ts = _scalar(table, "request_ts", np.int64)
    long_seq = long_history_arrays(table, schema, max_len, long_max_len) if long_max_len else None
    kinds = list(schema.sequences)
    sizes = BatchSizes({k: tuple(seq_ts.lengths[i * b:(i + 1) * b].tolist()) for i, k in enumerate(kinds)},
                       tuple(c_len.tolist()), None if long_seq is None else tuple(long_seq.lengths[:b].tolist()))
    return BatchArrays(
        request_id=_scalar(table, "request_id", np.int64),
        user_id=_scalar(table, "user_id", np.int64),
        request_ts=request_ts,
        sparse=sparse,
        dense=np.ascontiguousarray(dense),
        seq=seq,
        seq_ts=seq_ts,
        cand=_keyed(["item_id", "category"], [cand_item.values, cand_cat.values], [c_len, c_len]),
        cand_offsets=offsets_from_lengths(c_len),
        labels=np.ascontiguousarray(labels, dtype=np.float32),
        true_prob=None if true_prob is None else np.ascontiguousarray(true_prob, dtype=np.float32),
        long_seq=long_seq,
        id_features=_id_feature_arrays(kinds, seq, seq_ts, cand_item.values, cand_cat.values, c_len, request_ts,
                                       time_gap_buckets),
        sizes=sizes, time_gap_buckets=time_gap_buckets,
    )


def collate(table: pa.Table, schema: DataSchema, max_len: int, long_max_len: int = 0,
            time_gap_buckets: int = TIME_GAP_BUCKETS) -> RequestBatch:
    """One :class:`RequestBatch` from ``B`` rows of a validated table."""
    return collate_arrays(table, schema, max_len, long_max_len, time_gap_buckets).to_batch()
