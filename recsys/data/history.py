"""Behaviour histories of requests, in memory proportional to the events, not to the history pairs.

The history of request ``(u, t)`` for kind ``S`` is every event of user ``u`` and kind ``S`` with
``timestamp < t`` (strictly), oldest first, ties in time kept in log order, the last ``max_history`` of
them when that is set. Once the events of a kind are sorted by (user, time, log order), that history is
one contiguous slice ``[lo, hi)`` of the sorted array, so a request needs two integers, not a copy of
its events: :class:`HistorySlices` keeps the sorted event values once plus ``start`` / ``length`` per
request, and writes the (request, event) pairs out only for the rows asked for (one Parquet row group
at a time in ``parquet_io.write_requests``). Ingest memory is then O(events + requests) whatever the
histories' lengths; the written output is O(sum of history lengths) <= O(requests * max_history).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from recsys.data.jagged import Jagged, offsets_from_lengths, range_index
from recsys.data.parquet_io import RequestColumns
from recsys.data.schema import DataSchema

HISTORY_FIELDS = (("item_id", "item_id"), ("category", "category"), ("action", "action"), ("ts", "timestamp"))
"""(``seq_<S>_<field>`` name, events column) of every history column."""


class HistorySlices(Jagged):
    """A jagged column whose row ``i`` is ``base[starts[i] : starts[i] + lengths[i]]`` (rows may overlap).

    Behaves as a :class:`Jagged` (``values``, ``offsets``, ``take``, ``slice``, ``tail``...), but
    ``values`` is built on each access (``sum(lengths)`` elements): :meth:`take` and :meth:`tail` stay
    slices, :meth:`slice` (a row range, as the Parquet writer asks for) and :meth:`materialize` build
    values. Call ``materialize()`` once and keep the :class:`Jagged` when you need the values repeatedly.
    """

    def __init__(self, base: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> None:  # noqa: D107
        self.base = np.asarray(base)
        self.starts = np.asarray(starts, dtype=np.int64)
        self._lengths = np.asarray(lengths, dtype=np.int64)
        if self.starts.shape != self._lengths.shape or self.starts.ndim != 1:
            raise ValueError("starts and lengths must be 1-d of the same length")
        if self.starts.size and (self.starts.min() < 0 or self._lengths.min() < 0
                                 or int((self.starts + self._lengths).max()) > len(self.base)):
            raise ValueError("a slice reaches outside the base array")
        self._offsets: np.ndarray | None = None

    @property
    def offsets(self) -> np.ndarray:  # type: ignore[override]
        """[N+1] int64 row boundaries of the materialized values (computed once)."""
        if self._offsets is None:
            self._offsets = offsets_from_lengths(self._lengths)
        return self._offsets

    @property
    def values(self) -> np.ndarray:  # type: ignore[override]
        """[sum lengths] every row's values back to back (built on each access)."""
        return self.materialize().values

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    @property
    def num_rows(self) -> int:
        return len(self.starts)

    def materialize(self) -> Jagged:
        """The plain :class:`Jagged` of these rows."""
        index, offsets = range_index(self.starts, self._lengths)
        return Jagged(self.base[index], offsets)

    def take(self, rows: np.ndarray) -> HistorySlices:
        rows = np.asarray(rows, dtype=np.int64)
        return HistorySlices(self.base, self.starts[rows], self._lengths[rows])

    def slice(self, start: int, stop: int) -> Jagged:
        """Rows ``start:stop``, materialized (the only values held are those of the range)."""
        return HistorySlices(self.base, self.starts[start:stop], self._lengths[start:stop]).materialize()

    def tail(self, max_len: int) -> HistorySlices:
        keep = np.minimum(self._lengths, max_len)
        return HistorySlices(self.base, self.starts + self._lengths - keep, keep)

    def unique_values(self) -> np.ndarray:
        """Sorted distinct values of all rows, from the base entries some row covers (no materialization)."""
        n = len(self.base) + 1  # +1 at each start, -1 at each end: the running sum counts covering rows
        cover = np.bincount(self.starts, minlength=n) - np.bincount(self.starts + self._lengths, minlength=n)
        return np.unique(self.base[np.cumsum(cover[:-1]) > 0])

    def __repr__(self) -> str:
        return f"HistorySlices(rows={self.num_rows}, values={int(self._lengths.sum())}, base={len(self.base)})"


def unique_values(col: Jagged) -> np.ndarray:
    """Sorted distinct values of a jagged column (a :class:`HistorySlices` without building its values)."""
    return col.unique_values() if isinstance(col, HistorySlices) else np.unique(col.values)


def history_bounds(ev_user: np.ndarray, ev_ts: np.ndarray, user_id: np.ndarray, request_ts: np.ndarray,
                   max_history: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, count)`` [R]: request r's history is sorted events ``lo[r] : lo[r] + count[r]``.

    ``ev_user``, ``ev_ts``: the events of one kind sorted by (user, time, log order). Requests and
    events are merged in (user, time) order with a request placed *before* events of the same second;
    the number of events before a request in that order is the end of its history, and the first
    event of its user the start (moved up to keep ``max_history``).
    """
    n_ev = len(ev_user)
    is_event = np.concatenate([np.ones(n_ev, np.int8), np.zeros(len(user_id), np.int8)])
    order = np.lexsort((is_event, np.concatenate([ev_ts, request_ts]), np.concatenate([ev_user, user_id])))
    events_before = np.cumsum(is_event[order]) - is_event[order]  # exclusive count at each merged slot
    hi = np.empty(len(user_id), dtype=np.int64)
    req_slots = np.flatnonzero(order >= n_ev)
    hi[order[req_slots] - n_ev] = events_before[req_slots]
    lo = np.searchsorted(ev_user, user_id, side="left")
    if max_history is not None:
        lo = np.maximum(lo, hi - max_history)
    return lo, hi - lo


def attach_history(events: pl.DataFrame, user_id: np.ndarray, request_ts: np.ndarray, kinds: Sequence[str],
                   *, max_history: int | None = None, lazy: bool = False) -> RequestColumns:
    """The behaviour history of every request, per kind: the ``seq_<S>_*`` jagged columns.

    ``events``: columns user_id, timestamp, kind, item_id, category, action and, to break ties in time,
    event_idx (else row order). ``user_id``, ``request_ts``: [R]. See the module docstring for the rule.
    ``lazy``: columns are :class:`HistorySlices` (memory O(events + requests)); else plain
    :class:`Jagged` (memory O(sum of history lengths), the same values).
    """
    user_id = np.asarray(user_id, dtype=np.int64)
    request_ts = np.asarray(request_ts, dtype=np.int64)
    if "event_idx" not in events.columns:
        events = events.with_row_index("event_idx")
    out: RequestColumns = {}
    for kind in kinds:
        ev = events.filter(pl.col("kind") == kind).sort(["user_id", "timestamp", "event_idx"])
        lo, counts = history_bounds(ev["user_id"].to_numpy().astype(np.int64),
                                    ev["timestamp"].to_numpy().astype(np.int64), user_id, request_ts, max_history)
        if not lazy:
            index, offsets = range_index(lo, counts)
        for fld, src in HISTORY_FIELDS:
            base = ev[src].to_numpy().astype(np.int64)
            out[DataSchema.seq_col(kind, fld)] = HistorySlices(base, lo, counts) if lazy else \
                Jagged(base[index], offsets)
    return out
