"""Per-user cache of VQ memory states: a request costs O(new old events), not O(history).

The memory of a request summarises its long history's events *outside* the S-token window
(``in_window == 0``), per kind the oldest ``n_old_k`` rows of that kind in ``long_seq``. When a
user's next request arrives, its history is the previous one plus appended events, so each kind's
old part is the previous old part plus the events that slid out of the window: the cached state is
extended with those rows only (``VQMemory.append``). A miss (new user, a history that is not an
extension, or the loader's ``long_max_len`` dropping the oldest events) rebuilds from all old rows.

Extension check per kind, O(1): the cached entry's first old event and its last summarised old
event (item id, timestamp) must sit at the same positions of the new request's old part.
Results equal a rebuild to float tolerance (sums in another order; ``tests/longseq/test_memory_cache.py``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import RequestBatch
from recsys.data.jagged import lengths_to_offsets
from recsys.longseq.memory import MemoryState

Fingerprint = tuple[int, int] | None


@dataclass
class MemoryEntry:
    """One user's cached memory: ``state`` (``B = 1``) of the first ``n_old[k]`` old events of each kind."""

    state: MemoryState
    n_old: list[int]
    first: list[Fingerprint]
    """Per kind, (item, ts) of the oldest summarised event (None if none)."""
    last: list[Fingerprint]
    """Per kind, (item, ts) of the newest summarised event (None if none)."""


class LongMemoryCache:
    """LRU map user id -> :class:`MemoryEntry` (``max_users`` entries of ``M x (D+1)`` floats each)."""

    def __init__(self, max_users: int = 100_000) -> None:
        if max_users < 1:
            raise ValueError(f"max_users must be >= 1, got {max_users}")
        self.max_users = max_users
        self.entries: OrderedDict[int, MemoryEntry] = OrderedDict()
        self.counts = {"hit": 0, "append": 0, "miss": 0}

    def clear(self) -> None:
        """Drop every entry (counters kept)."""
        self.entries.clear()

    @torch.no_grad()
    def states(self, tokenizer, batch: RequestBatch) -> MemoryState:
        """``[B]`` memory states of the batch's requests, through the cache (requests in batch order,
        so a user's second request in the batch extends its first one's state)."""
        long = tokenizer.long
        if long is None or long.memory is None or batch.long_seq is None:
            raise ValueError("LongMemoryCache needs model.long_seq.memory and a batch with long_seq")
        n_kinds = len(tokenizer.kinds)
        d = {k: jt for k, jt in batch.long_seq.to_dict().items()}
        lengths = d["kind"].lengths().to(torch.int64)
        offs = lengths_to_offsets(lengths).tolist()
        kind, in_win = d["kind"].values().tolist(), d["in_window"].values().tolist()
        item, ts = d["item_id"].values().tolist(), d["ts"].values().tolist()
        users = batch.user_id.tolist()
        plans = []  # per request: (base entry or None, delta rows, n_old, first, last)
        for b in range(batch.num_requests):
            lo, hi = offs[b], offs[b + 1]
            start, n_old = [0] * n_kinds, [0] * n_kinds
            for r in range(hi - 1, lo - 1, -1):  # kind-major rows: the lowest row of each kind is its start
                start[kind[r]] = r
            for r in range(lo, hi):
                n_old[kind[r]] += in_win[r] == 0
            fp = lambda r: (item[r], ts[r])  # noqa: E731
            first = [fp(start[k]) if n_old[k] else None for k in range(n_kinds)]
            last = [fp(start[k] + n_old[k] - 1) if n_old[k] else None for k in range(n_kinds)]
            plans.append((start, n_old, first, last))
        out_sums, out_counts = [], []
        for b, (start, n_old, first, last) in enumerate(plans):
            entry = self.entries.get(users[b])
            extends = entry is not None and all(
                entry.n_old[k] <= n_old[k] and (entry.n_old[k] == 0 or (
                    entry.first[k] == first[k] and
                    (item[start[k] + entry.n_old[k] - 1], ts[start[k] + entry.n_old[k] - 1]) == entry.last[k]))
                for k in range(n_kinds))
            done = [entry.n_old[k] if extends else 0 for k in range(n_kinds)]
            rows = [r for k in range(n_kinds) for r in range(start[k] + done[k], start[k] + n_old[k])]
            base = entry.state if extends else long.memory.empty_state(batch.request_ts.device, torch.float32)
            status = "miss" if not extends else ("append" if rows else "hit")
            self.counts[status] += 1
            state = base
            if rows:
                idx = torch.tensor(rows, dtype=torch.int64, device=batch.request_ts.device)
                sub = KeyedJaggedTensor(keys=list(d), values=torch.cat([d[k].values()[idx] for k in d]),
                                        lengths=torch.tensor([len(rows)] * len(d), dtype=torch.int32))
                state = long.memory.append(base, tokenizer.long_event_features(sub))
            self.entries[users[b]] = MemoryEntry(state, list(n_old), first, last)
            self.entries.move_to_end(users[b])
            while len(self.entries) > self.max_users:
                self.entries.popitem(last=False)
            out_sums.append(state.sums)
            out_counts.append(state.counts)
        return MemoryState(torch.cat(out_sums), torch.cat(out_counts))
