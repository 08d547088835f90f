"""Event log -> request rows (the one code path that builds histories, for real and synthetic data).

An event log is a table with ``user_id, item_id, timestamp`` and optionally
``action`` (an action type or strength, e.g. a rating), ``kind`` (the behaviour
sequence it belongs to: click / like / ...), a label column, plus an optional item
table ``item_id -> category`` and an optional user table ``user_id -> features``.

Before any row is built the options are checked (``config.IngestConfig``) and the log is read and
checked (``event_input.py``: quoting, id normalization, timestamp units and range, labels, exact
duplicates); every refusal is an ``InputError`` naming the file, column, row and value.

The history of a request ``(u, t)`` for kind ``S`` is every event of user ``u`` and
kind ``S`` with ``timestamp < t`` (strictly: an event at the request's own second is
*not* history), oldest first, ties in time kept in log order. It is computed for all
requests at once by one merge of the sorted events with the sorted requests
(:func:`recsys.data.history.attach_history`), so it is leakage-free by construction rather than by
filter, and kept as slices of the sorted events (``HistorySlices``): ingest memory is O(events +
requests); the (request, event) pairs are written out one Parquet row group at a time.

Raw ids of any type are re-encoded to dense ids ``1..n`` in sorted order of the raw
values (id 0 stays *unknown*); already dense integer ids ``1..n`` map to themselves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from recsys.data.config import IngestConfig
from recsys.data.event_input import (
    REQUIRED_EVENT_COLUMNS,
    CheckedEvents,
    check_events,
    label_values,
    normalize_ids,
    read_frame,
    table_name,
)
from recsys.data.history import attach_history
from recsys.data.jagged import Jagged
from recsys.data.parquet_io import RequestColumns
from recsys.data.schema import DataSchema, SparseFeature
from recsys.data.splits import SPLIT_CODES, leave_one_out_split, sample_negatives, time_split
from recsys.errors import InputError

__all__ = ["REQUIRED_EVENT_COLUMNS", "SPLIT_CODES", "EventLog", "IngestResult", "attach_history", "cast_ids",
           "dense_ids", "encode_event_log", "event_seconds", "ingest_event_log", "leave_one_out_split",
           "read_frame", "sample_negatives", "time_split", "user_feature_columns"]


MAX_ABS_SECONDS = 2**62
"""Timestamps are checked to lie in ``(-2**62, 2**62)`` s, so every difference of two fits in int64."""


def event_seconds(ts: pl.Series) -> pl.Series:
    """Event times as int64 seconds: integers as is, whole finite floats, or datetimes (epoch seconds).

    Raises ``InputError`` naming the first offending value (fractional, NaN/Inf, out of range) or the dtype.
    """
    if ts.dtype == pl.Date or isinstance(ts.dtype, pl.Datetime):
        ts = ts.dt.epoch("s")
    elif ts.dtype.is_float():
        bad = (~ts.is_finite() | (ts != ts.round()) | (ts.abs() >= MAX_ABS_SECONDS)).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(f"event log timestamp {ts[i]!r} (row {i}) is not a whole number of seconds in "
                             f"(-2**62, 2**62)")
    elif not ts.dtype.is_integer():
        raise InputError(f"event log column 'timestamp' has dtype {ts.dtype}; expected integer seconds "
                         "(whole floats and datetimes are converted)")
    far = (ts.cast(pl.Float64).abs() >= MAX_ABS_SECONDS).to_numpy()  # float: abs(int64 min) would overflow
    if far.any():
        i = int(np.flatnonzero(far)[0])
        raise InputError(f"event log timestamp {ts[i]!r} (row {i}) is outside (-2**62, 2**62) seconds")
    return ts.cast(pl.Int64)


def cast_ids(ids: pl.Series, dtype: pl.DataType, what: str) -> pl.Series:
    """``ids`` of a side table normalized like the log's (``event_input.normalize_ids``: ``9.0`` is ``9``)
    and cast to the event log's id dtype, or an ``InputError`` saying which table."""
    ids, _ = normalize_ids(ids, what)
    try:
        return ids.cast(dtype)
    except pl.exceptions.PolarsError as e:
        raise InputError(f"{what}: column {ids.name!r} of dtype {ids.dtype} does not convert to the event log's "
                         f"{dtype} ids ({str(e).splitlines()[0]})") from e


def dense_ids(*series: pl.Series) -> tuple[list[np.ndarray], pl.Series]:
    """Encodes raw values shared by several series to ids ``1..n`` (sorted raw order); nulls -> 0.

    Returns one int64 array per input and the vocabulary (raw value of id ``i`` at
    position ``i - 1``).
    """
    lengths = [len(s) for s in series]
    allv = pl.concat([s.rename("v") for s in series])
    codes = allv.rank("dense").fill_null(0).to_numpy().astype(np.int64)
    vocab = allv.drop_nulls().unique().sort()
    out, start = [], 0
    for n in lengths:
        out.append(codes[start:start + n])
        start += n
    return out, vocab


@dataclass
class EventLog:
    """An encoded event log: every id dense, one row per event."""

    events: pl.DataFrame
    """user_id, item_id, category, action (int64 ids), kind (str), timestamp (int64), event_idx (log order)."""
    kinds: list[str]
    """Behaviour kinds present, in order of first appearance in the log."""
    num_items: int
    """Item table size (max id + 1)."""
    num_categories: int
    """Category table size."""
    num_actions: int
    """Action table size."""
    item_vocab: pl.Series
    """Raw item id of dense id i at position i - 1."""
    user_vocab: pl.Series
    """Raw user id of dense id i at position i - 1."""
    item_category: np.ndarray
    """[num_items] category id of every item id (0 = unknown), from the item table."""
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    """Other per-event columns kept as numpy (e.g. a label or rating), aligned with ``events``."""


def encode_event_log(events: pl.DataFrame, *, item_features: pl.DataFrame | None = None,
                     default_kind: str = "event", keep: Sequence[str] = (),
                     item_table: str = "item feature table", name: str = "event log") -> EventLog:
    """Validates and encodes a raw event log (see the module docstring for its columns).

    ``item_features``: ``item_id`` and ``category`` (first row per item wins); items
    only in this table still get an id, so the item table covers the whole catalog.
    ``keep``: raw columns carried along as numpy in ``EventLog.extra``. ``item_table``, ``name``: how
    messages name the item table and the event log.
    """
    missing = [c for c in REQUIRED_EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise InputError(f"{name} lacks column(s) {missing}; it needs {list(REQUIRED_EVENT_COLUMNS)}")
    nulls = {c: events[c].null_count() for c in REQUIRED_EVENT_COLUMNS if events[c].null_count()}
    if nulls:
        raise InputError(f"{name} has nulls in {nulls}")
    ts = event_seconds(events["timestamp"])
    (users,), user_vocab = dense_ids(events["user_id"])
    if item_features is not None:
        if not {"item_id", "category"} <= set(item_features.columns):
            raise InputError(f"{item_table} needs columns item_id, category (it has {item_features.columns})")
        # cast (and normalize) first, so ids equal after the cast are one item
        item_features = item_features.with_columns(
            cast_ids(item_features["item_id"], events["item_id"].dtype, item_table)).unique(
            subset="item_id", keep="first", maintain_order=True)
        feat_ids = item_features["item_id"]
        (items, feat_items), item_vocab = dense_ids(events["item_id"], feat_ids)
        (feat_cats,), _ = dense_ids(item_features["category"])
        item_cat = np.zeros(len(item_vocab) + 1, dtype=np.int64)
        item_cat[feat_items] = feat_cats
        categories = item_cat[items]
        num_categories = max(2, int(feat_cats.max(initial=0)) + 1)
    else:
        (items,), item_vocab = dense_ids(events["item_id"])
        item_cat = np.zeros(len(item_vocab) + 1, dtype=np.int64)
        num_categories = 2
        categories = item_cat[items]
    if "action" in events.columns:
        (actions,), action_vocab = dense_ids(events["action"])
        num_actions = max(2, len(action_vocab) + 1)
    else:
        actions, num_actions = np.ones(len(items), dtype=np.int64), 2
    if "kind" in events.columns:
        kind = events["kind"].cast(pl.String)
        if kind.null_count():
            raise InputError(f"{name}: column 'kind' has {kind.null_count()} null value(s), first at row "
                             f"{int(np.flatnonzero(kind.is_null().to_numpy())[0])}")
    else:
        kind = pl.select(pl.repeat(default_kind, len(events), dtype=pl.String)).to_series()
    kinds = list(dict.fromkeys(kind.to_list()))
    frame = pl.DataFrame({
        "user_id": users, "item_id": items, "category": categories, "action": actions,
        "kind": kind, "timestamp": ts.cast(pl.Int64), "event_idx": np.arange(len(events), dtype=np.int64)})
    extra = {c: events[c].to_numpy() for c in keep}
    return EventLog(frame, kinds, len(item_vocab) + 1, num_categories, num_actions, item_vocab, user_vocab,
                    item_cat, extra)


@dataclass
class IngestResult:
    """Request rows built from an event log, not yet written."""

    schema: DataSchema
    columns: RequestColumns
    split: np.ndarray
    """[R] int8 split codes (``SPLIT_CODES``)."""
    timings: dict[str, float]
    cold_items: np.ndarray | None = None
    """Dense ids of the items held out as cold start (``ingest_event_log(cold_items=...)``), sorted."""
    counters: dict[str, int | str] = field(default_factory=dict)
    """What the input policies did (``event_input.CheckedEvents.counters``): duplicate_events_dropped,
    user_ids_normalized, item_ids_normalized, timestamp_unit (the unit the times were read in)."""


def user_feature_columns(user_features: pl.DataFrame | None, user_vocab: pl.Series,
                         request_user: np.ndarray, what: str = "user feature table"
                         ) -> tuple[list[SparseFeature], dict[str, np.ndarray]]:
    """Every non-``user_id`` column of the user table becomes a sparse feature (values encoded 1..n,
    users missing from the table -> 0). ``what``: how messages name the table."""
    if user_features is None:
        return [], {}
    if "user_id" not in user_features.columns:
        raise InputError(f"{what} needs a user_id column (it has {user_features.columns})")
    # cast (and normalize) before keeping the first row per user: one row per user for the join
    user_features = user_features.with_columns(cast_ids(user_features["user_id"], user_vocab.dtype, what)).unique(
        subset="user_id", keep="first", maintain_order=True)
    lookup = pl.DataFrame({"user_id": user_vocab}).join(user_features, on="user_id", how="left",
                                                        maintain_order="left")
    specs, cols = [], {}
    for name in user_features.columns:
        if name == "user_id":
            continue
        (codes,), vocab = dense_ids(lookup[name])
        per_user = np.concatenate([[0], codes])  # dense user id -> code
        specs.append(SparseFeature(name, max(2, len(vocab) + 1)))
        cols[name] = per_user[request_user]
    return specs, cols


def ingest_event_log(events: pl.DataFrame | str | Path, *, item_features: pl.DataFrame | str | Path | None = None,
                     user_features: pl.DataFrame | str | Path | None = None, task: str = "click",
                     label_column: str | None = None, positive_threshold: float | None = None,
                     num_negatives: int = 0, target_kind: str | None = None, split: str = "leave_one_out",
                     valid_fraction: float = 0.1, test_fraction: float = 0.1, max_history: int | None = None,
                     default_kind: str = "event", seed: int = 0,
                     cold_items: Sequence | np.ndarray | None = None, duplicates: str = "drop",
                     timestamp_unit: str = "auto", name: str | None = None) -> IngestResult:
    """Builds request rows from an event log: one request per event of ``target_kind`` (default: every event).

    Candidates: the event's item (label from ``label_column``, >= ``positive_threshold`` when given; 1 if
    there is no label column) plus ``num_negatives`` sampled items the user never interacted with (label 0).
    History: :func:`attach_history` over every kind, the last ``max_history`` events per kind, kept as
    slices of the sorted events (``HistorySlices``). Split: ``leave_one_out`` per user by time (ties: log
    order) or ``time`` (global quantiles of request time). ``duplicates``, ``timestamp_unit``: the input
    policies of ``event_input.py``; what they did is in ``IngestResult.counters``. ``name``: how messages
    name the event log (default: its path, or "event log" for a DataFrame). Every option is checked
    (``IngestConfig``) before any file is read.

    ``cold_items`` (raw item ids, item cold-start protocol): their events are dropped from every history,
    every request whose positive is one of them goes to test, the split above runs over the other
    requests, and no negative is drawn from them, so no train/valid row and no history ever shows them.
    """
    opts = IngestConfig(task=task, label_column=label_column, positive_threshold=positive_threshold,
                        num_negatives=num_negatives, target_kind=target_kind, split=split,
                        valid_fraction=valid_fraction, test_fraction=test_fraction, max_history=max_history,
                        default_kind=default_kind, seed=seed, duplicates=duplicates, timestamp_unit=timestamp_unit)
    t0 = time.perf_counter()
    where = table_name(events, "event log", name)
    raw = read_frame(events)
    if opts.label_column is not None and opts.label_column not in raw.columns:
        raise InputError(f"{where} has no label column {opts.label_column!r} (columns: {raw.columns})")
    checked = check_events(raw, where, unit=opts.timestamp_unit, duplicates=opts.duplicates)
    # labels converted on the table as read, so a refusal names the row of the file
    labels = None if opts.label_column is None else label_values(raw[opts.label_column], where)[checked.source_row]
    item_table = None if item_features is None else table_name(item_features, "item feature table")
    user_table = None if user_features is None else table_name(user_features, "user feature table")
    items_df = None if item_features is None else read_frame(item_features)
    users_df = None if user_features is None else read_frame(user_features)
    log = encode_event_log(checked.frame, item_features=items_df, default_kind=opts.default_kind,
                           item_table=item_table or "item feature table", name=where)
    ev = log.events
    target = ev if opts.target_kind is None else ev.filter(pl.col("kind") == opts.target_kind)
    if len(target) == 0:
        raise InputError(f"{where} has no rows: no event to turn into requests" if len(ev) == 0 else
                         f"no event of kind {opts.target_kind!r} in {where} to turn into requests "
                         f"(kinds present: {log.kinds})")
    t_encode = time.perf_counter()

    cold_event, cold_dense = cold_item_events(cold_items, checked.frame["item_id"], ev)
    req_user, req_ts, req_order, codes = request_split(target, cold_event, opts)
    pos_label = positive_labels(labels, req_order, checked, opts, where)
    cand_cols = candidate_columns(req_user, ev["item_id"].to_numpy()[req_order], pos_label, log, opts, cold_dense)
    sparse_specs, sparse_cols = user_feature_columns(users_df, log.user_vocab, req_user,
                                                     user_table or "user feature table")
    try:
        schema = DataSchema(sparse=sparse_specs, dense=[], sequences=log.kinds, tasks=[opts.task],
                            num_items=log.num_items, num_categories=log.num_categories,
                            num_actions=log.num_actions, has_true_prob=False)
    except ValueError as e:  # a kind / task / user-feature name the column names cannot hold
        raise InputError(f"{where}: {e} (sequence kinds come from column 'kind', the task from ingest.task, "
                         "sparse features from the user table's columns)") from e
    cols: RequestColumns = {
        "request_id": np.arange(len(req_user), dtype=np.int64),
        "user_id": req_user,
        "request_ts": req_ts,
        **sparse_cols,
        **attach_history(ev.filter(pl.Series(~cold_event)), req_user, req_ts, log.kinds,
                         max_history=opts.max_history, lazy=True),
        **cand_cols,
    }
    t_done = time.perf_counter()
    return IngestResult(schema, cols, codes, {"encode_s": t_encode - t0, "build_rows_s": t_done - t_encode},
                        cold_dense, dict(checked.counters))


def cold_item_events(cold_items: Sequence | np.ndarray | None, raw_items: pl.Series, ev: pl.DataFrame
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """``(is cold [N] aligned with ev, sorted dense cold ids or None)``; unknown raw ids are refused."""
    cold_event = np.zeros(len(ev), dtype=bool)  # aligned with ev (event_idx = row order of the checked log)
    if cold_items is None or not len(cold_items):
        return cold_event, None
    wanted = cast_ids(pl.Series("item_id", np.asarray(cold_items)), raw_items.dtype, "cold_items")
    present = wanted.is_in(raw_items.implode())
    if not present.all():
        raise InputError(f"cold_items: {int((~present).sum())} id(s) not in the event log, e.g. "
                         f"{wanted.filter(~present).head(5).to_list()}")
    cold_event = raw_items.is_in(wanted.implode()).to_numpy()
    return cold_event, np.unique(ev["item_id"].to_numpy()[cold_event])


def request_split(target: pl.DataFrame, cold_event: np.ndarray, opts: IngestConfig
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(user, ts, event_idx, split code)`` of every request, ordered by (user, time, log order): the
    position in that order is the request id. Cold-item requests go to test, the split runs over the rest."""
    req_user = target["user_id"].to_numpy().astype(np.int64)
    req_ts = target["timestamp"].to_numpy().astype(np.int64)
    req_order = target["event_idx"].to_numpy().astype(np.int64)
    warm = ~cold_event[req_order]
    codes = np.full(len(req_user), SPLIT_CODES["test"], dtype=np.int8)
    if opts.split == "leave_one_out":
        codes[warm] = leave_one_out_split(req_user[warm], req_ts[warm], req_order[warm])
    else:
        codes[warm] = time_split(req_ts[warm], opts.valid_fraction, opts.test_fraction)
    perm = np.lexsort((req_order, req_ts, req_user))
    return req_user[perm], req_ts[perm], req_order[perm], codes[perm]


def positive_labels(labels: np.ndarray | None, req_order: np.ndarray, checked: CheckedEvents,
                    opts: IngestConfig, where: str) -> np.ndarray:
    """[R] float32 label of each request's own item; a missing or (without a threshold) non-0/1 label of a
    request is refused, naming its row in the table as read."""
    if labels is None:
        return np.ones(len(req_order), dtype=np.float32)
    raw_label = labels[req_order]
    col = opts.label_column
    missing = np.isnan(raw_label)
    if missing.any():
        row = int(checked.source_row[req_order[missing]].min())
        raise InputError(f"{where}: label column {col!r} has {int(missing.sum())} missing value(s), first at row "
                         f"{row}")
    if opts.positive_threshold is not None:
        return (raw_label >= opts.positive_threshold).astype(np.float32)
    bad = req_order[~np.isin(raw_label, (0.0, 1.0))]
    if bad.size:
        k = int(bad[np.argmin(checked.source_row[bad])])  # the first offending row of the table
        raise InputError(f"{where}: label column {col!r}, row {int(checked.source_row[k])}: {float(labels[k])!r} "
                         "is not 0/1 (or give positive_threshold to binarize)")
    return raw_label.astype(np.float32)


def candidate_columns(req_user: np.ndarray, pos_item: np.ndarray, pos_label: np.ndarray, log: EventLog,
                      opts: IngestConfig, cold_dense: np.ndarray | None) -> RequestColumns:
    """``cand_item_id``, ``cand_category``, ``cand_label_<task>``: the request's item, then the negatives."""
    ev = log.events
    if opts.num_negatives > 0:
        negs = sample_negatives(req_user, opts.num_negatives, log.num_items, ev["user_id"].to_numpy(),
                                ev["item_id"].to_numpy(), opts.seed, excluded_items=cold_dense)
        cand_items = np.concatenate([pos_item[:, None], negs], axis=1)  # [R, 1 + k]
        cand_labels = np.zeros(cand_items.shape, dtype=np.float32)
        cand_labels[:, 0] = pos_label
    else:
        cand_items, cand_labels = pos_item[:, None], pos_label[:, None]
    lengths = np.full(len(req_user), cand_items.shape[1], dtype=np.int64)
    return {"cand_item_id": Jagged.from_lengths(cand_items.ravel(), lengths),
            "cand_category": Jagged.from_lengths(log.item_category[cand_items.ravel()], lengths),
            f"cand_label_{opts.task}": Jagged.from_lengths(cand_labels.ravel(), lengths)}
