"""Random long histories for tests and benchmarks: a ``RequestBatch`` plus older events.

``with_long_history(batch, schema, old)`` keeps the batch's ``seq`` as the S-token window and
attaches ``long_seq`` = (``old[b]`` random events per kind, strictly older than the window) +
(the window's events, ``in_window = 1``), in the layout of ``RequestBatch.long_seq``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import RequestBatch
from recsys.data.collate import LONG_KEYS
from recsys.data.schema import DataSchema


def with_long_history(batch: RequestBatch, schema: DataSchema, old: Sequence[int], *, seed: int = 0,
                      num_categories: int | None = None) -> RequestBatch:
    """``old[b]``: events per kind older than request b's window (0 = the long history is the window).

    ``num_categories``: draw old categories from ``1..num_categories-1`` (default: the schema's).
    """
    g = torch.Generator().manual_seed(seed)
    seq, ts = batch.seq.to_dict(), batch.seq_ts.to_dict()
    n_cat = num_categories or schema.num_categories
    rows: list[list[torch.Tensor]] = [[] for _ in range(batch.num_requests)]  # per request: [n, 6] blocks
    for ki, kind in enumerate(schema.sequences):
        lens = ts[kind].lengths().tolist()
        start = 0
        for b, n_win in enumerate(lens):
            win_ts = ts[kind].values()[start:start + n_win]
            oldest = int(win_ts.min()) if n_win else int(batch.request_ts[b])
            n_old = int(old[b])
            old_ts = oldest - 1 - torch.sort(torch.randint(0, 10**6, (n_old,), generator=g), descending=True).values
            old_block = torch.stack([torch.randint(1, schema.num_items, (n_old,), generator=g),
                                     torch.randint(1, n_cat, (n_old,), generator=g),
                                     torch.randint(1, schema.num_actions, (n_old,), generator=g), old_ts,
                                     torch.full((n_old,), ki), torch.zeros(n_old, dtype=torch.int64)], 1)
            win_block = torch.stack([seq[f"{kind}.item_id"].values()[start:start + n_win],
                                     seq[f"{kind}.category"].values()[start:start + n_win],
                                     seq[f"{kind}.action"].values()[start:start + n_win], win_ts,
                                     torch.full((n_win,), ki), torch.ones(n_win, dtype=torch.int64)], 1)
            rows[b] += [old_block.to(torch.int64), win_block.to(torch.int64)]
            start += n_win
    per_req = [torch.cat(r) if r else torch.zeros(0, len(LONG_KEYS), dtype=torch.int64) for r in rows]
    lengths = torch.tensor([r.shape[0] for r in per_req], dtype=torch.int32)
    flat = torch.cat(per_req)  # [E, 6], request-major
    values = torch.cat([flat[:, i] for i in range(len(LONG_KEYS))])  # key-major
    long_seq = KeyedJaggedTensor(keys=list(LONG_KEYS), values=values, lengths=lengths.repeat(len(LONG_KEYS)))
    return replace(batch, long_seq=long_seq)
