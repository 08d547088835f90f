"""Event log -> request rows (the one code path that builds histories, for real and synthetic data).

An event log is a table with ``user_id, item_id, timestamp`` and optionally
``action`` (an action type or strength, e.g. a rating), ``kind`` (the behaviour
sequence it belongs to: click / like / ...), a label column, plus an optional item
table ``item_id -> category`` and an optional user table ``user_id -> features``.

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

from recsys.data.history import attach_history
from recsys.data.jagged import Jagged
from recsys.data.parquet_io import RequestColumns
from recsys.data.schema import DataSchema, SparseFeature
from recsys.data.splits import SPLIT_CODES, leave_one_out_split, sample_negatives, time_split

__all__ = ["REQUIRED_EVENT_COLUMNS", "SPLIT_CODES", "EventLog", "IngestResult", "attach_history", "cast_ids",
           "dense_ids", "encode_event_log", "event_seconds", "ingest_event_log", "leave_one_out_split",
           "read_frame", "sample_negatives", "time_split", "user_feature_columns"]

REQUIRED_EVENT_COLUMNS = ("user_id", "item_id", "timestamp")


def read_frame(src: pl.DataFrame | str | Path, separator: str | None = None) -> pl.DataFrame:
    """A DataFrame as is, or a Parquet / CSV / TSV file (``.tsv``, ``.inter``... read tab-separated)."""
    if isinstance(src, pl.DataFrame):
        return src
    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"event/feature table {path} does not exist")
    try:
        if path.suffix == ".parquet":
            return pl.read_parquet(path)
        sep = separator or ("," if path.suffix == ".csv" else "\t")
        return pl.read_csv(path, separator=sep, quote_char=None, infer_schema_length=10000)
    except (pl.exceptions.PolarsError, OSError) as e:  # ragged rows, bad encoding, not a Parquet file...
        raise ValueError(f"cannot read {path} as {'Parquet' if path.suffix == '.parquet' else 'CSV/TSV'}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


MAX_ABS_SECONDS = 2**62
"""Timestamps are checked to lie in ``(-2**62, 2**62)`` s, so every difference of two fits in int64."""


def event_seconds(ts: pl.Series) -> pl.Series:
    """Event times as int64 seconds: integers as is, whole finite floats, or datetimes (epoch seconds).

    Raises ``ValueError`` naming the first offending value (fractional, NaN/Inf, out of range) or the dtype.
    """
    if ts.dtype == pl.Date or isinstance(ts.dtype, pl.Datetime):
        ts = ts.dt.epoch("s")
    elif ts.dtype.is_float():
        bad = (~ts.is_finite() | (ts != ts.round()) | (ts.abs() >= MAX_ABS_SECONDS)).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"event log timestamp {ts[i]!r} (row {i}) is not a whole number of seconds in "
                             f"(-2**62, 2**62)")
    elif not ts.dtype.is_integer():
        raise ValueError(f"event log column 'timestamp' has dtype {ts.dtype}; expected integer seconds "
                         "(whole floats and datetimes are converted)")
    far = (ts.cast(pl.Float64).abs() >= MAX_ABS_SECONDS).to_numpy()  # float: abs(int64 min) would overflow
    if far.any():
        i = int(np.flatnonzero(far)[0])
        raise ValueError(f"event log timestamp {ts[i]!r} (row {i}) is outside (-2**62, 2**62) seconds")
    return ts.cast(pl.Int64)


def cast_ids(ids: pl.Series, dtype: pl.DataType, what: str) -> pl.Series:
    """``ids`` of a side table cast to the event log's id dtype, or a ``ValueError`` saying which table."""
    try:
        return ids.cast(dtype)
    except pl.exceptions.PolarsError as e:
        raise ValueError(f"{what}: column {ids.name!r} of dtype {ids.dtype} does not convert to the event log's "
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
                     default_kind: str = "event", keep: Sequence[str] = ()) -> EventLog:
    """Validates and encodes a raw event log (see the module docstring for its columns).

    ``item_features``: ``item_id`` and ``category`` (first row per item wins); items
    only in this table still get an id, so the item table covers the whole catalog.
    ``keep``: raw columns carried along as numpy in ``EventLog.extra``.
    """
    missing = [c for c in REQUIRED_EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"event log lacks column(s) {missing}; it needs {list(REQUIRED_EVENT_COLUMNS)}")
    nulls = {c: events[c].null_count() for c in REQUIRED_EVENT_COLUMNS if events[c].null_count()}
    if nulls:
        raise ValueError(f"event log has nulls in {nulls}")
    ts = event_seconds(events["timestamp"])
    (users,), user_vocab = dense_ids(events["user_id"])
    if item_features is not None:
        if not {"item_id", "category"} <= set(item_features.columns):
            raise ValueError("item feature table needs columns item_id, category")
        item_features = item_features.unique(subset="item_id", keep="first", maintain_order=True)
        feat_ids = cast_ids(item_features["item_id"], events["item_id"].dtype, "item feature table")
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
            raise ValueError(f"event log has {kind.null_count()} null value(s) in column 'kind'")
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


def user_feature_columns(user_features: pl.DataFrame | None, user_vocab: pl.Series,
                         request_user: np.ndarray) -> tuple[list[SparseFeature], dict[str, np.ndarray]]:
    """Every non-``user_id`` column of the user table becomes a sparse feature (values encoded 1..n,
    users missing from the table -> 0)."""
    if user_features is None:
        return [], {}
    if "user_id" not in user_features.columns:
        raise ValueError("user feature table needs a user_id column")
    user_features = user_features.unique(subset="user_id", keep="first", maintain_order=True)
    lookup = pl.DataFrame({"user_id": user_vocab}).join(
        user_features.with_columns(cast_ids(user_features["user_id"], user_vocab.dtype, "user feature table")),
        on="user_id", how="left",
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
                     cold_items: Sequence | np.ndarray | None = None) -> IngestResult:
    """Builds request rows from an event log: one request per event of ``target_kind`` (default: every event).

    Candidates: the event's item (label from ``label_column``, >= ``positive_threshold`` when given; 1 if
    there is no label column) plus ``num_negatives`` sampled items the user never interacted with (label 0).
    History: :func:`attach_history` over every kind, kept as slices of the sorted events
    (``HistorySlices``). Split: ``leave_one_out`` per user by time (ties: log
    order) or ``time`` (global quantiles of request time).

    ``cold_items`` (raw item ids, item cold-start protocol): their events are dropped from every history,
    every request whose positive is one of them goes to test, the split above runs over the other
    requests, and no negative is drawn from them, so no train/valid row and no history ever shows them.
    """
    t0 = time.perf_counter()
    raw = read_frame(events)
    if label_column is not None and label_column not in raw.columns:
        raise ValueError(f"label column {label_column!r} not in the event log {raw.columns}")
    items_df = None if item_features is None else read_frame(item_features)
    users_df = None if user_features is None else read_frame(user_features)
    log = encode_event_log(raw, item_features=items_df, default_kind=default_kind,
                           keep=[label_column] if label_column else [])
    ev = log.events
    target = ev if target_kind is None else ev.filter(pl.col("kind") == target_kind)
    if len(target) == 0:
        raise ValueError("the event log has no rows" if len(ev) == 0 else
                         f"no event of kind {target_kind!r} to turn into requests (kinds present: {log.kinds})")
    t_encode = time.perf_counter()

    cold_event = np.zeros(len(ev), dtype=bool)  # aligned with ev (event_idx = raw row order)
    cold_dense = None
    if cold_items is not None and len(cold_items):
        wanted = cast_ids(pl.Series("item_id", np.asarray(cold_items)), raw["item_id"].dtype, "cold_items")
        present = wanted.is_in(raw["item_id"].implode())
        if not present.all():
            raise ValueError(f"cold_items: {int((~present).sum())} id(s) not in the event log, e.g. "
                             f"{wanted.filter(~present).head(5).to_list()}")
        cold_event = raw["item_id"].is_in(wanted.implode()).to_numpy()
        cold_dense = np.unique(ev["item_id"].to_numpy()[cold_event])
    req_user = target["user_id"].to_numpy().astype(np.int64)
    req_ts = target["timestamp"].to_numpy().astype(np.int64)
    req_order = target["event_idx"].to_numpy().astype(np.int64)
    warm = ~cold_event[req_order]
    codes = np.full(len(req_user), SPLIT_CODES["test"], dtype=np.int8)
    if split == "leave_one_out":
        codes[warm] = leave_one_out_split(req_user[warm], req_ts[warm], req_order[warm])
    elif split == "time":
        codes[warm] = time_split(req_ts[warm], valid_fraction, test_fraction)
    else:
        raise ValueError(f"split must be 'leave_one_out' or 'time', got {split!r}")
    # requests ordered by (user, time, log order); request_id = that position
    perm = np.lexsort((req_order, req_ts, req_user))
    req_user, req_ts, req_order, codes = req_user[perm], req_ts[perm], req_order[perm], codes[perm]
    r = len(req_user)

    pos_item = ev["item_id"].to_numpy()[req_order]
    if label_column is None:
        pos_label = np.ones(r, dtype=np.float32)
    else:
        raw_label = log.extra[label_column][req_order].astype(np.float64)
        if np.isnan(raw_label).any():
            raise ValueError(f"label column {label_column!r} has {int(np.isnan(raw_label).sum())} missing value(s)")
        if positive_threshold is not None:
            pos_label = (raw_label >= positive_threshold).astype(np.float32)
        else:
            if not np.isin(raw_label, (0.0, 1.0)).all():
                raise ValueError(f"label column {label_column!r} must be 0/1 (or give positive_threshold)")
            pos_label = raw_label.astype(np.float32)
    item_cat = log.item_category
    if num_negatives > 0:
        negs = sample_negatives(req_user, num_negatives, log.num_items, ev["user_id"].to_numpy(),
                                ev["item_id"].to_numpy(), seed, excluded_items=cold_dense)
        cand_items = np.concatenate([pos_item[:, None], negs], axis=1)  # [R, 1 + k]
        cand_labels = np.zeros(cand_items.shape, dtype=np.float32)
        cand_labels[:, 0] = pos_label
    else:
        cand_items, cand_labels = pos_item[:, None], pos_label[:, None]
    k = cand_items.shape[1]
    lengths = np.full(r, k, dtype=np.int64)
    sparse_specs, sparse_cols = user_feature_columns(users_df, log.user_vocab, req_user)
    cols: RequestColumns = {
        "request_id": np.arange(r, dtype=np.int64),
        "user_id": req_user,
        "request_ts": req_ts,
        **sparse_cols,
        **attach_history(ev.filter(pl.Series(~cold_event)), req_user, req_ts, log.kinds, max_history=max_history,
                         lazy=True),
        "cand_item_id": Jagged.from_lengths(cand_items.ravel(), lengths),
        "cand_category": Jagged.from_lengths(item_cat[cand_items.ravel()], lengths),
        f"cand_label_{task}": Jagged.from_lengths(cand_labels.ravel(), lengths),
    }
    schema = DataSchema(sparse=sparse_specs, dense=[], sequences=log.kinds, tasks=[task],
                        num_items=log.num_items, num_categories=log.num_categories,
                        num_actions=log.num_actions, has_true_prob=False)
    t_done = time.perf_counter()
    return IngestResult(schema, cols, codes, {"encode_s": t_encode - t0, "build_rows_s": t_done - t_encode},
                        cold_dense)

