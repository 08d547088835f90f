"""``UserKVCache``: cross-request LRU of per-user S-token states, bounded by bytes.

Keyed by user id; each entry is a :class:`~recsys.serving.state.UserKVState` whose event
identities are its version. A lookup with the new request's events (merged S order) is

* a **hit** when they are equal: nothing is computed;
* a **partial hit** (append) when the cached events are a strict prefix: only the new
  positions are computed (``extend_states``) and the entry is replaced by the longer state;
* a **miss** otherwise (new user, history changed, or loader truncation dropped the oldest
  event): the state is computed from scratch and replaces the entry.

Bound: the sum of ``entry.nbytes`` never exceeds ``max_bytes``; inserting evicts least
recently used entries (a lookup that hits refreshes recency); an entry larger than the whole
bound is not cached (``rejected``) and any stale entry of that user is dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

from recsys.serving.events import common_prefix_status


class CacheEntry(Protocol):
    events: np.ndarray

    @property
    def nbytes(self) -> int: ...

    @property
    def length(self) -> int: ...


@dataclass
class CacheStats:
    """Counters of a :class:`UserKVCache` (monotone except ``bytes`` / ``entries``)."""

    lookups: int = 0
    hits: int = 0
    """Full hits: the cached events equal the request's."""
    partial_hits: int = 0
    """Appends: the cached events are a strict prefix of the request's."""
    misses: int = 0
    evictions: int = 0
    """Entries dropped to make room (LRU)."""
    rejected: int = 0
    """States larger than the whole budget, not cached."""
    inserts: int = 0
    reused_tokens: int = 0
    """S tokens served from the cache (hit: all; append: the cached part)."""
    computed_tokens: int = 0
    """S tokens run through the layers (append: the new part; miss: all)."""
    bytes: int = 0
    """Bytes held now."""
    peak_bytes: int = 0
    entries: int = 0

    @property
    def hit_rate(self) -> float:
        """(full + partial hits) / lookups."""
        return (self.hits + self.partial_hits) / self.lookups if self.lookups else 0.0

    @property
    def token_reuse_rate(self) -> float:
        """Share of S tokens not recomputed."""
        total = self.reused_tokens + self.computed_tokens
        return self.reused_tokens / total if total else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "hit_rate": self.hit_rate, "full_hit_rate": self.hits / max(1, self.lookups),
                "token_reuse_rate": self.token_reuse_rate}


class UserKVCache:
    """LRU of user id -> state, holding at most ``max_bytes`` bytes (0 disables caching)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[int, CacheEntry] = OrderedDict()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, user_id: int) -> bool:
        return int(user_id) in self._entries

    def peek(self, user_id: int) -> CacheEntry | None:
        """The entry without touching recency or counters."""
        return self._entries.get(int(user_id))

    def lookup(self, user_id: int, events: np.ndarray) -> tuple[str, CacheEntry | None]:
        """Classify a request of ``user_id`` with ``events [L, 5]`` against the cache.

        Returns ``("hit", entry)``, ``("append", entry)`` (reuse ``entry``, compute
        ``L - entry.length`` new positions) or ``("miss", None)``; updates the counters and,
        on (partial) hits, the entry's recency.
        """
        uid = int(user_id)
        self.stats.lookups += 1
        entry = self._entries.get(uid)
        status = "miss" if entry is None else common_prefix_status(entry.events, events)
        n = int(events.shape[0])
        if status == "hit":
            self.stats.hits += 1
            self.stats.reused_tokens += n
        elif status == "append":
            self.stats.partial_hits += 1
            self.stats.reused_tokens += entry.length
            self.stats.computed_tokens += n - entry.length
        else:
            self.stats.misses += 1
            self.stats.computed_tokens += n
            return "miss", None
        self._entries.move_to_end(uid)
        return status, entry

    def put(self, user_id: int, entry: CacheEntry) -> bool:
        """Insert or replace ``user_id``'s entry as most recently used; False if it cannot fit at all."""
        uid = int(user_id)
        old = self._entries.pop(uid, None)
        if old is not None:
            self.stats.bytes -= old.nbytes
        size = entry.nbytes
        if size > self.max_bytes:
            self.stats.rejected += 1
            self.stats.entries = len(self._entries)
            return False
        while self.stats.bytes + size > self.max_bytes:
            _, victim = self._entries.popitem(last=False)
            self.stats.bytes -= victim.nbytes
            self.stats.evictions += 1
        self._entries[uid] = entry
        self.stats.bytes += size
        self.stats.inserts += 1
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.bytes)
        self.stats.entries = len(self._entries)
        return True

    def clear(self) -> None:
        """Drop every entry (counters other than ``bytes`` / ``entries`` are kept)."""
        self._entries.clear()
        self.stats.bytes = 0
        self.stats.entries = 0
