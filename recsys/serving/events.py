"""The version of a user's S tokens: their behaviour events in the ranker's merged S order.

A cached prefix is valid for a later request only if the later request's S-token
sequence *starts with* the cached one. S tokens depend on nothing but the events
(see ``recsys.features.tokenizer``), so comparing event identities in the same order
as the tokenizer merges them is an exact test. Each S position is one row of an int64
array ``[L, 5]``::

    (kind index, item_id, category, action, ts)        a behaviour event
    (kind index, -1, -1, -1, -1)                       the [SEP_k] token (intent_grouped only)

Worked example, kinds (click, like), time-interleaved, one request::

    click: items [7, 3] at ts [100, 160];  like: item [3] at ts 160
    merged (ts, then kind order on ties):  [[0, 7, c, a, 100], [0, 3, c, a, 160], [1, 3, c, a, 160]]

Keeping the rows themselves (40 bytes per event) rather than a hash makes the prefix
test collision-free; they are small next to the K/V they guard (``8 * D`` bytes per
event per layer).
"""

from __future__ import annotations

import numpy as np

from recsys.data.batch import RequestBatch
from recsys.data.jagged import offsets_from_lengths
from recsys.model.config import SeqMerge

EVENT_FIELDS = ("kind", "item_id", "category", "action", "ts")
SEP_FIELD = -1


def merged_events(batch: RequestBatch, kinds: list[str], seq_merge: SeqMerge | str) -> tuple[np.ndarray, np.ndarray]:
    """Event identities of every request in merged S order, as a jagged array.

    Returns ``values [sum L_b, 5] int64`` and ``offsets [B+1] int64``, where ``L_b`` equals the
    number of S tokens the tokenizer makes for request b (the scorer asserts it). The order
    reproduces ``UnifiedTokenizer._merge``: time-interleaved = stable sort by ts of the
    kind-major concatenation (ties: kind order, then position); intent-grouped = kind order,
    each kind's events followed by its SEP row.
    """
    b = batch.num_requests
    seq = batch.seq.to_dict()
    ts = batch.seq_ts.to_dict()
    rows, reqs, ranks = [], [], []
    for ki, kind in enumerate(kinds):
        lengths = ts[kind].lengths().cpu().numpy().astype(np.int64)
        n = int(lengths.sum())
        offsets = offsets_from_lengths(lengths)
        req = np.repeat(np.arange(b, dtype=np.int64), lengths)
        pos = np.arange(n, dtype=np.int64) - np.repeat(offsets[:-1], lengths)  # position inside the kind
        cols = [np.full(n, ki, dtype=np.int64)]
        cols += [seq[f"{kind}.{f}"].values().cpu().numpy().astype(np.int64) for f in ("item_id", "category", "action")]
        t = ts[kind].values().cpu().numpy().astype(np.int64)
        cols.append(t)
        rows.append(np.stack(cols, 1))  # [n, 5]
        reqs.append(req)
        ranks.append(np.stack([np.full(n, ki), pos, t], 1))
        if str(getattr(seq_merge, "value", seq_merge)) == SeqMerge.intent_grouped.value:
            rows.append(np.concatenate([np.full((b, 1), ki), np.full((b, 4), SEP_FIELD)], 1).astype(np.int64))
            reqs.append(np.arange(b, dtype=np.int64))
            ranks.append(np.stack([np.full(b, ki), np.full(b, np.iinfo(np.int64).max), np.zeros(b, np.int64)], 1))
    values = np.concatenate(rows) if rows else np.zeros((0, 5), np.int64)
    req_all = np.concatenate(reqs)
    rank = np.concatenate(ranks)
    if str(getattr(seq_merge, "value", seq_merge)) == SeqMerge.intent_grouped.value:
        order = np.lexsort((rank[:, 1], rank[:, 0], req_all))  # request, kind, position (SEP last)
    elif str(getattr(seq_merge, "value", seq_merge)) == SeqMerge.time_interleaved.value:
        kind_major = np.arange(len(req_all))  # cat order is kind-major: the tokenizer's tie-break
        order = np.lexsort((kind_major, rank[:, 2], req_all))  # request, ts, kind-major position
    else:
        raise ValueError(f"unknown seq_merge {seq_merge!r}")
    counts = np.bincount(req_all, minlength=b).astype(np.int64)
    return values[order], offsets_from_lengths(counts)


def common_prefix_status(cached: np.ndarray, new: np.ndarray) -> str:
    """``"hit"`` (equal), ``"append"`` (``cached`` is a strict prefix of ``new``) or ``"miss"``."""
    n = cached.shape[0]
    if n > new.shape[0] or not np.array_equal(cached, new[:n]):
        return "miss"
    return "hit" if n == new.shape[0] else "append"
