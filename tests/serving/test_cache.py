"""UserKVCache: byte bound, LRU order, oversize entries, counters."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from recsys.serving.cache import UserKVCache


@dataclass
class Entry:
    events: np.ndarray
    size: int

    @property
    def nbytes(self) -> int:
        return self.size

    @property
    def length(self) -> int:
        return int(self.events.shape[0])


def ev(n: int, seed: int = 0) -> np.ndarray:
    return np.arange(5 * n, dtype=np.int64).reshape(n, 5) + seed


def test_lru_eviction_and_bound():
    cache = UserKVCache(100)
    for u in range(3):
        assert cache.put(u, Entry(ev(1), 30))
    assert cache.stats.bytes == 90 and len(cache) == 3
    assert cache.lookup(0, ev(1))[0] == "hit"  # 0 becomes most recent: order 1, 2, 0
    assert cache.put(3, Entry(ev(1), 30))  # evicts 1
    assert 1 not in cache and {0, 2, 3} <= {u for u in range(4) if u in cache}
    assert cache.put(4, Entry(ev(1), 60))  # needs 60: evicts 2, then 0
    assert [u for u in range(5) if u in cache] == [3, 4]
    assert cache.stats.evictions == 3 and cache.stats.bytes == 90 <= cache.max_bytes
    assert cache.stats.peak_bytes <= cache.max_bytes


def test_entry_larger_than_bound_is_not_cached_and_drops_stale():
    cache = UserKVCache(100)
    cache.put(7, Entry(ev(2), 50))
    assert not cache.put(7, Entry(ev(3), 101))  # the new state is too big: the stale one must go too
    assert 7 not in cache and cache.stats.bytes == 0 and cache.stats.rejected == 1
    assert cache.lookup(7, ev(3))[0] == "miss"


def test_replace_counts_bytes_once():
    cache = UserKVCache(100)
    cache.put(1, Entry(ev(2), 40))
    cache.put(1, Entry(ev(3), 70))
    assert cache.stats.bytes == 70 and cache.stats.evictions == 0 and len(cache) == 1


def test_lookup_statuses_and_counters():
    cache = UserKVCache(10**6)
    assert cache.lookup(1, ev(3))[0] == "miss"
    cache.put(1, Entry(ev(3), 10))
    assert cache.lookup(1, ev(3))[0] == "hit"
    status, entry = cache.lookup(1, ev(5))
    assert status == "append" and entry.length == 3
    changed = ev(5)
    changed[0, 1] += 1
    assert cache.lookup(1, changed)[0] == "miss"  # same length, different first event
    assert cache.lookup(1, ev(2))[0] == "miss"  # shorter than the cached one
    cache.put(2, Entry(ev(0), 1))
    assert cache.lookup(2, ev(1))[0] == "append"  # append to an empty history
    s = cache.stats
    assert (s.lookups, s.hits, s.partial_hits, s.misses) == (6, 1, 2, 3)
    assert s.reused_tokens == 3 + 3 + 0 and s.computed_tokens == 3 + 2 + 5 + 2 + 1
    assert s.hit_rate == pytest.approx(3 / 6)


def test_random_workload_never_exceeds_bound():
    rng = np.random.default_rng(0)
    cache = UserKVCache(1000)
    for _ in range(2000):
        u = int(rng.integers(0, 50))
        if cache.lookup(u, ev(1))[0] == "miss":
            cache.put(u, Entry(ev(1), int(rng.integers(1, 1200))))
        assert cache.stats.bytes <= 1000
        assert cache.stats.bytes == sum(cache.peek(v).nbytes for v in range(50) if v in cache)
    assert cache.stats.evictions > 0 and cache.stats.rejected > 0


def test_zero_budget_caches_nothing():
    cache = UserKVCache(0)
    assert not cache.put(1, Entry(ev(1), 1)) and len(cache) == 0
    with pytest.raises(ValueError):
        UserKVCache(-1)
