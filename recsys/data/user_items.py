"""(user, item, time) of a split's positives: what a negative sampler must not draw for a user's request.

A retriever trained on every position of a user's history scores that user's *later* items high, so its
top K for an early request holds items the same user takes next; drawn as negatives, they teach a ranker
to push down exactly what the user does next (false negatives). :class:`UserPositives` holds every
``(user_id, item)`` with a positive label in the given request-row files, as sorted keys
``user_id * num_items + item`` (one ``int64`` each: ``searchsorted`` membership, no per-user Python sets),
with the pair's latest request time: ``taken_later`` says which items the user takes at or after a given
request. Items the user took only *before* it (its history) stay valid negatives: "not again".
Memory: 16 bytes per distinct positive pair (key + time), held by every training process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from recsys.data.parquet_io import open_parquet, read_parquet_table
from recsys.data.schema import DataSchema
from recsys.errors import InputError


class UserPositives:
    """Sorted ``(user, item)`` keys of the positive candidates in ``files`` (see the module docstring).

    ``every_listed``: every listed candidate counts as positive (leave-one-out next-item data, where the
    listed item is what the user took, whatever its label); otherwise a candidate labelled 1 on any task.
    """

    def __init__(self, files: list[Path], schema: DataSchema, every_listed: bool) -> None:
        self.num_items = schema.num_items
        label_cols = [f"cand_label_{t}" for t in schema.tasks]
        keys, times = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for f in files:
            pf = open_parquet(f)  # a damaged file: an InputError naming it
            table = read_parquet_table(f, ["user_id", "request_ts", "cand_item_id", *label_cols], pf)
            counts = pc.list_value_length(table.column("cand_item_id")).to_numpy()
            users = np.repeat(table.column("user_id").to_numpy().astype(np.int64), counts)
            if users.size and int(users.max()) > np.iinfo(np.int64).max // max(self.num_items, 1):
                raise InputError(f"{f}: user_id {int(users.max())} is too large for (user, item) keys over "
                                 f"{self.num_items} items; map user ids to dense ids, or set "
                                 "train.hard_negatives.exclude_user_positives=false")
            ts = np.repeat(table.column("request_ts").to_numpy().astype(np.int64), counts)
            items = pc.list_flatten(table.column("cand_item_id")).to_numpy().astype(np.int64)
            keep = np.ones(items.size, dtype=bool) if every_listed else np.zeros(items.size, dtype=bool)
            if not every_listed:
                for c in label_cols:
                    keep |= pc.list_flatten(table.column(c)).to_numpy() > 0.5
            keys.append(users[keep] * self.num_items + items[keep])
            times.append(ts[keep])
        key, t = np.concatenate(keys), np.concatenate(times)
        order = np.lexsort((t, key))  # by key, then time: the last row of each key holds its latest time
        key, t = key[order], t[order]
        last = np.r_[key[1:] != key[:-1], True] if key.size else np.zeros(0, dtype=bool)
        self.keys, self.last_ts = key[last], t[last]

    def __len__(self) -> int:
        return int(self.keys.size)

    def taken_later(self, user: int, request_ts: int, items: np.ndarray) -> np.ndarray:
        """``[n]`` bool: which of ``items`` the user has a positive for at or after ``request_ts``."""
        q = user * self.num_items + np.asarray(items, dtype=np.int64)
        if not self.keys.size:
            return np.zeros(q.size, dtype=bool)
        pos = np.minimum(np.searchsorted(self.keys, q), self.keys.size - 1)
        return (self.keys[pos] == q) & (self.last_ts[pos] >= request_ts)


__all__ = ["UserPositives"]
