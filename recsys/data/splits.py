"""Train / valid / test splits of request rows, and sampled negatives (used by ingest and the generator)."""

from __future__ import annotations

import numpy as np

from recsys.errors import InputError

SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}


def leave_one_out_split(user_id: np.ndarray, timestamp: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """Per user, by time (ties: ``order``, default row order): last -> test (2), second-to-last -> valid (1),
    the rest -> train (0). Returns int8 codes [N] (see ``SPLIT_CODES``)."""
    n = len(user_id)
    order = np.arange(n) if order is None else np.asarray(order)
    idx = np.lexsort((order, timestamp, user_id))
    u = np.asarray(user_id)[idx]
    # position from the end inside the user's block
    block_end = np.searchsorted(u, u, side="right")
    from_end = block_end - 1 - np.arange(n)
    codes = np.zeros(n, dtype=np.int8)
    codes[idx] = np.where(from_end == 0, 2, np.where(from_end == 1, 1, 0))
    return codes


def time_split(request_ts: np.ndarray, valid_fraction: float, test_fraction: float) -> np.ndarray:
    """Global split by request time: the latest ``test_fraction`` -> test, the ``valid_fraction`` before it ->
    valid. Ties in time are broken by row order. Returns int8 codes [N]."""
    n = len(request_ts)
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(request_ts, kind="stable")] = np.arange(n)
    n_test, n_valid = int(round(n * test_fraction)), int(round(n * valid_fraction))
    codes = np.zeros(n, dtype=np.int8)
    codes[rank >= n - n_test - n_valid] = 1
    codes[rank >= n - n_test] = 2
    return codes


def sample_negatives(user_id: np.ndarray, num_negatives: int, num_items: int, interacted_user: np.ndarray,
                     interacted_item: np.ndarray, seed: int, max_rounds: int = 100,
                     excluded_items: np.ndarray | None = None) -> np.ndarray:
    """``[R, num_negatives]`` item ids drawn uniformly from ``1..num_items-1`` among items the request's user
    never interacted with (in the whole log) and not in ``excluded_items``, by rejection. Seeded; raises if
    a user has (almost) no such item."""
    rng = np.random.default_rng(seed)
    r = len(user_id)
    seen = np.unique(interacted_user.astype(np.int64) * num_items + interacted_item.astype(np.int64))
    excluded = np.zeros(0, dtype=np.int64) if excluded_items is None else np.asarray(excluded_items, np.int64)
    users = np.repeat(np.asarray(user_id, dtype=np.int64), num_negatives)
    out = rng.integers(1, num_items, size=r * num_negatives)

    def rejected(slots: np.ndarray) -> np.ndarray:
        return slots[np.isin(users[slots] * num_items + out[slots], seen) | np.isin(out[slots], excluded)]

    bad = rejected(np.arange(len(out)))
    rounds = 0
    while bad.size:
        rounds += 1
        if rounds > max_rounds:
            raise InputError(f"could not sample negatives for {bad.size} slots: users interacted with almost "
                             f"every item of the {num_items - 1} (lower num_negatives={num_negatives})")
        out[bad] = rng.integers(1, num_items, size=bad.size)
        bad = rejected(bad)
    return out.reshape(r, num_negatives)
