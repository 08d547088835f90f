"""The id features the tokenizer's tables look up, built once per batch by the data pipeline.

Shape legend: ``B`` requests, ``K`` sequence kinds, ``L_bk`` history length of request b in kind
k, ``C_b`` candidates of request b.

One :class:`KeyedJaggedTensor` (``RequestBatch.id_features``) holds, key-major, every id the
sequence ``EmbeddingCollection`` reads (:data:`ID_FEATURE_FIELDS`):

* per kind ``"<kind>.item_id"``, ``".category"``, ``".action"`` (the events, oldest first) and
  ``"<kind>.time_gap"``: log2 bucket of the gap to the previous event of the same kind (0 for the
  first event), lengths ``L_bk``;
* ``"cand.item_id"``, ``"cand.category"``: lengths ``C_b``;
* ``"req.recency"``: one bucket per request, of ``request_ts - newest event`` over all kinds
  (0 for an empty history).

Bucketing is a pure function of the data, so it runs in the loader workers (``collate``), not
in the forward. The KJT carries ``length_per_key`` (Python ints): ``to_dict`` / the torchrec
lookups never read it back from the lengths.
"""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.config import TIME_GAP_BUCKETS  # noqa: F401  (re-exported: the loader's and collate's default)
from recsys.data.jagged import lengths_to_offsets

SEQ_ID_FIELDS = ("item_id", "category", "action", "time_gap")
"""Per-kind keys ``"<kind>.<field>"`` of ``RequestBatch.id_features``."""
CAND_ID_FIELDS = ("item_id", "category")
"""Candidate keys ``"cand.<field>"``."""
RECENCY_KEY = "req.recency"


def id_feature_keys(kinds: list[str]) -> list[str]:
    """Keys of ``RequestBatch.id_features``, in order."""
    return [f"{k}.{f}" for k in kinds for f in SEQ_ID_FIELDS] + [f"cand.{f}" for f in CAND_ID_FIELDS] + [RECENCY_KEY]


def time_gap_bucket(gap_s: torch.Tensor, buckets: int) -> torch.Tensor:
    """log2 bucket of a non-negative gap in seconds, in ``1 .. buckets-1`` (0 is reserved)."""
    b = torch.floor(torch.log2(gap_s.clamp_min(0).to(torch.float64) + 1.0)).to(torch.int64) + 1
    return b.clamp_(1, buckets - 1)


def previous_event_gap_bucket(ts: torch.Tensor, lengths: torch.Tensor, buckets: int) -> torch.Tensor:
    """Jagged ``ts [sum L_b]`` (oldest first) -> bucket of ``ts_i - ts_{i-1}``; 0 for each first event."""
    gap = torch.zeros_like(ts)
    gap[1:] = ts[1:] - ts[:-1]
    out = time_gap_bucket(gap, buckets)
    firsts = lengths_to_offsets(lengths)[:-1][lengths > 0]
    out[firsts] = 0
    return out


def recency_bucket(request_ts: torch.Tensor, ts: list[torch.Tensor], lengths: list[torch.Tensor],
                   buckets: int) -> torch.Tensor:
    """``[B]`` bucket of ``request_ts - newest event`` over all kinds (``ts[k] [sum L_bk]``); 0 if none."""
    newest = torch.full_like(request_ts, torch.iinfo(torch.int64).min)
    for values, ln in zip(ts, lengths):
        owner = torch.repeat_interleave(torch.arange(request_ts.numel(), device=newest.device), ln)
        newest = newest.scatter_reduce(0, owner, values, reduce="amax")
    empty = newest == torch.iinfo(torch.int64).min
    out = time_gap_bucket(request_ts - torch.where(empty, request_ts, newest), buckets)
    return torch.where(empty, torch.zeros_like(out), out)


def keyed_jagged(keys: list[str], values: list[torch.Tensor], lengths: list[torch.Tensor]) -> KeyedJaggedTensor:
    """A key-major KJT (int64 values, int32 lengths ``[K * B]``) with ``length_per_key`` given as
    Python ints (from the value counts, no host sync)."""
    if not keys:
        return KeyedJaggedTensor(keys=[], values=torch.zeros(0, dtype=torch.int64),
                                 lengths=torch.zeros(0, dtype=torch.int32))
    per_key = [int(v.numel()) for v in values]
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values).to(torch.int64),
                             lengths=torch.cat(lengths).to(torch.int32), stride=int(lengths[0].numel()),
                             length_per_key=per_key)


def build_id_features(kinds: list[str], seq: dict[str, torch.Tensor], seq_lengths: dict[str, torch.Tensor],
                      ts: dict[str, torch.Tensor], cand: dict[str, torch.Tensor], cand_lengths: torch.Tensor,
                      request_ts: torch.Tensor, buckets: int) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    """Values and lengths of every key of :func:`id_feature_keys` (see the module docstring).

    ``seq["<kind>.<field>"] [sum L_bk]`` for the fields item_id, category, action; ``seq_lengths[kind] [B]``;
    ``ts[kind] [sum L_bk]`` int64 seconds; ``cand["item_id" | "category"] [sum C_b]``; ``cand_lengths [B]``;
    ``request_ts [B]``.
    """
    values, lengths = [], []
    for k in kinds:
        ln = seq_lengths[k]
        for fld in SEQ_ID_FIELDS[:3]:
            values.append(seq[f"{k}.{fld}"])
            lengths.append(ln)
        values.append(previous_event_gap_bucket(ts[k], ln, buckets))
        lengths.append(ln)
    for fld in CAND_ID_FIELDS:
        values.append(cand[fld])
        lengths.append(cand_lengths)
    values.append(recency_bucket(request_ts, [ts[k] for k in kinds], [seq_lengths[k] for k in kinds], buckets))
    lengths.append(torch.ones_like(request_ts))
    return id_feature_keys(kinds), values, lengths
