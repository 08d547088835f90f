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

from recsys.data.config import EventColumns, IngestConfig, OovPolicy
from recsys.data.event_input import (
    REQUIRED_EVENT_COLUMNS,
    CheckedEvents,
    apply_mapping,
    cast_ids,
    check_events,
    check_mapping,
    label_values,
    read_frame,
    table_name,
)
from recsys.data.history import attach_history
from recsys.data.id_maps import FEATURE_PREFIX, IdMaps, vocab_table
from recsys.data.jagged import Jagged
from recsys.data.parquet_io import RequestColumns
from recsys.data.schema import DataSchema, SparseFeature
from recsys.data.splits import SPLIT_CODES, leave_one_out_split, sample_negatives, time_split
from recsys.errors import InputError

__all__ = ["REQUIRED_EVENT_COLUMNS", "SPLIT_CODES", "EventLog", "IngestResult", "attach_history", "cast_ids",
           "dense_ids", "encode_event_log", "encode_with_maps", "event_seconds", "ingest", "ingest_event_log",
           "leave_one_out_split", "read_frame", "read_tables", "sample_negatives", "time_split",
           "user_feature_columns"]


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
    category_vocab: pl.Series | None = None
    """Raw category of dense id i at position i - 1 (None: no item table)."""
    action_vocab: pl.Series | None = None
    """Raw action of dense id i at position i - 1 (None: no action column)."""
    counters: dict[str, int] = field(default_factory=dict)
    """Encoding with stored maps (:func:`encode_with_maps`): new users, unknown ids and their rows."""

    def id_maps(self, user_features: dict[str, np.ndarray] | None = None,
                feature_vocabs: dict[str, pl.Series] | None = None) -> IdMaps:
        """The raw <-> dense maps of this encoding (``recsys.data.id_maps``); ``user_features``: [users + 1]
        dense value per user of each sparse feature, ``feature_vocabs``: their raw values."""
        per_user = {name: codes[1:] for name, codes in (user_features or {}).items()}
        tables = {"users": vocab_table(self.user_vocab, **per_user),
                  "items": vocab_table(self.item_vocab, category=self.item_category[1:])}
        if self.category_vocab is not None:
            tables["categories"] = vocab_table(self.category_vocab)
        if self.action_vocab is not None:
            tables["actions"] = vocab_table(self.action_vocab)
        for name, vocab in (feature_vocabs or {}).items():
            tables[FEATURE_PREFIX + name] = vocab_table(vocab)
        return IdMaps(tables)


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
        (feat_cats,), category_vocab = dense_ids(item_features["category"])
        item_cat = np.zeros(len(item_vocab) + 1, dtype=np.int64)
        item_cat[feat_items] = feat_cats
        categories = item_cat[items]
        num_categories = max(2, int(feat_cats.max(initial=0)) + 1)
    else:
        (items,), item_vocab = dense_ids(events["item_id"])
        item_cat = np.zeros(len(item_vocab) + 1, dtype=np.int64)
        num_categories, category_vocab = 2, None
        categories = item_cat[items]
    if "action" in events.columns:
        (actions,), action_vocab = dense_ids(events["action"])
        num_actions = max(2, len(action_vocab) + 1)
    else:
        actions, num_actions, action_vocab = np.ones(len(items), dtype=np.int64), 2, None
    kind = event_kinds(events, default_kind, name)
    kinds = list(dict.fromkeys(kind.to_list()))
    frame = pl.DataFrame({
        "user_id": users, "item_id": items, "category": categories, "action": actions,
        "kind": kind, "timestamp": ts.cast(pl.Int64), "event_idx": np.arange(len(events), dtype=np.int64)})
    extra = {c: events[c].to_numpy() for c in keep}
    return EventLog(frame, kinds, len(item_vocab) + 1, num_categories, num_actions, item_vocab, user_vocab,
                    item_cat, extra, category_vocab, action_vocab)


def event_kinds(events: pl.DataFrame, default_kind: str, name: str) -> pl.Series:
    """The ``kind`` column as strings (nulls refused), or ``default_kind`` for every event without one."""
    if "kind" in events.columns:
        kind = events["kind"].cast(pl.String)
        if kind.null_count():
            raise InputError(f"{name}: column 'kind' has {kind.null_count()} null value(s), first at row "
                             f"{int(np.flatnonzero(kind.is_null().to_numpy())[0])}")
        return kind
    return pl.select(pl.repeat(default_kind, len(events), dtype=pl.String)).to_series()


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
    user_ids_normalized, item_ids_normalized, timestamp_unit (the unit the times were read in); with
    stored maps also new_users, unknown_items / _rows, unknown_actions / _rows (``encode_with_maps``)."""
    id_maps: IdMaps | None = None
    """Raw <-> dense maps of every encoded id (``recsys.data.id_maps``); write them with the rows."""


def user_feature_columns(user_features: pl.DataFrame | None, user_vocab: pl.Series, what: str = "user feature table"
                         ) -> tuple[list[SparseFeature], dict[str, np.ndarray], dict[str, pl.Series]]:
    """Every non-``user_id`` column of the user table becomes a sparse feature (values encoded 1..n,
    users missing from the table -> 0). Returns ``(specs, {name: [users + 1] value per dense user id},
    {name: raw value vocabulary})``. ``what``: how messages name the table."""
    if user_features is None:
        return [], {}, {}
    if "user_id" not in user_features.columns:
        raise InputError(f"{what} needs a user_id column (it has {user_features.columns})")
    # cast (and normalize) before keeping the first row per user: one row per user for the join
    user_features = user_features.with_columns(cast_ids(user_features["user_id"], user_vocab.dtype, what)).unique(
        subset="user_id", keep="first", maintain_order=True)
    lookup = pl.DataFrame({"user_id": user_vocab}).join(user_features, on="user_id", how="left",
                                                        maintain_order="left")
    specs, per_user, vocabs = [], {}, {}
    for name in user_features.columns:
        if name == "user_id":
            continue
        (codes,), vocab = dense_ids(lookup[name])
        per_user[name] = np.concatenate([[0], codes])  # dense user id -> code
        specs.append(SparseFeature(name, max(2, len(vocab) + 1)))
        vocabs[name] = vocab
    return specs, per_user, vocabs


def encode_with_maps(events: pl.DataFrame, maps: IdMaps, policy: OovPolicy = OovPolicy.error, *,
                     default_kind: str = "event", name: str = "event log") -> EventLog:
    """Encodes a raw event log in the id space of a prepared dataset (its stored maps and schema), so the
    rows fit that dataset's checkpoints: a new log of the same catalog.

    Items and actions take their stored dense ids; an unknown one is refused (``policy=error``) or
    becomes the unknown id 0 (``oov``), counted in ``EventLog.counters``. A user the maps lack gets a new
    id after the stored ones (user ids index no embedding table, so a new user is not out of
    vocabulary; counted as ``new_users``). Categories are the stored category of each item. Kinds must
    be among the stored schema's sequences.
    """
    schema = maps.schema
    if schema is None:
        raise InputError(f"id maps {maps.path} come without a schema.json: not a prepared dataset")
    ts = event_seconds(events["timestamp"])
    raw_users = cast_ids(events["user_id"], maps.raw_dtype("users"), name)
    known = maps.to_dense("users", raw_users, name)
    new = known.is_null().to_numpy()
    (new_codes,), new_vocab = dense_ids(raw_users.filter(pl.Series(new)))
    users = known.fill_null(0).to_numpy().astype(np.int64)
    users[new] = new_codes + maps.size("users")
    items, n_items, n_item_rows = maps.lookup("items", events["item_id"], policy, name)
    item_cat = np.zeros(schema.num_items, dtype=np.int64)
    stored = maps.table("items")
    item_cat[stored["dense_id"].to_numpy()] = stored["category"].to_numpy()
    n_actions = n_action_rows = 0
    if "actions" not in maps:  # trained without an action column: every event had action 1
        actions = np.ones(len(events), dtype=np.int64)
    elif "action" in events.columns:
        actions, n_actions, n_action_rows = maps.lookup("actions", events["action"], policy, name)
    else:
        actions = np.zeros(len(events), dtype=np.int64)  # the log has no action: unknown
    kind = event_kinds(events, default_kind, name)
    others = sorted(set(kind.unique().to_list()) - set(schema.sequences))
    if others:
        raise InputError(f"{name}: behaviour kind(s) {others} are not in the stored schema {maps.path} "
                         f"(its sequences: {schema.sequences}); the model has no history slot for them")
    frame = pl.DataFrame({
        "user_id": users, "item_id": items, "category": item_cat[items], "action": actions, "kind": kind,
        "timestamp": ts.cast(pl.Int64), "event_idx": np.arange(len(events), dtype=np.int64)})
    counters = {"new_users": len(new_vocab), "unknown_items": n_items, "unknown_item_rows": n_item_rows,
                "unknown_actions": n_actions, "unknown_action_rows": n_action_rows}
    user_vocab = pl.concat([maps.table("users")["raw_id"], new_vocab.cast(maps.raw_dtype("users"))])
    return EventLog(frame, list(schema.sequences), schema.num_items, schema.num_categories, schema.num_actions,
                    maps.table("items")["raw_id"], user_vocab, item_cat, counters=counters)


def stored_features(maps: IdMaps, log: EventLog) -> tuple[dict[str, np.ndarray], IdMaps]:
    """``({feature: [users + 1] value per dense user id}, the maps of the new rows)`` of a log encoded with
    ``maps``: stored users keep their stored feature values, new users get 0 (unknown) and are appended."""
    users = maps.table("users")
    n_total = len(log.user_vocab)
    per_user = {}
    for feat in (f.name for f in maps.schema.sparse):
        codes = np.zeros(n_total + 1, dtype=np.int64)
        if feat in users.columns:
            codes[users["dense_id"].to_numpy()] = users[feat].to_numpy()
        per_user[feat] = codes
    extended = vocab_table(log.user_vocab, **{k: v[1:] for k, v in per_user.items()})
    return per_user, IdMaps({**maps.tables, "users": extended}, maps.schema)


@dataclass
class InputTables:
    """The tables of one ingest as read, mapped columns readable under their standard names."""

    events: pl.DataFrame
    where: str
    """How messages name the event log (its path, or ``name``)."""
    items: pl.DataFrame | None = None
    item_table: str = "item feature table"
    users: pl.DataFrame | None = None
    user_table: str = "user feature table"


def read_tables(events: pl.DataFrame | str | Path, item_features: pl.DataFrame | str | Path | None,
                user_features: pl.DataFrame | str | Path | None, opts: IngestConfig, name: str | None = None,
                string_ids: Sequence[str] = (), header_only: bool = False) -> InputTables:
    """Checks the column mapping ``opts.columns`` (and ``label_column``) against every table's header, then
    reads the tables: a missing column is an ``InputError`` naming the key, the value and the table's
    columns before any table is read in full. ``string_ids``: standard id columns read as text.
    ``header_only``: stop after the checks (the tables come back without rows)."""
    cols, key = opts.columns, f"{opts.KEY}.columns"
    event_map = cols.mapping(cols.EVENT_FIELDS)
    specs = [(events, table_name(events, "event log", name), event_map),
             (item_features, None if item_features is None else table_name(item_features, "item feature table"),
              cols.mapping(("item_id", "category"))),
             (user_features, None if user_features is None else table_name(user_features, "user feature table"),
              cols.mapping(("user_id",)))]
    for i, (src, where, mapping) in enumerate(specs):
        if src is None:
            continue
        header = read_frame(src, header_only=True).columns
        check_mapping(header, mapping, where, key)
        if i == 0 and opts.label_column is not None and opts.label_column not in header:
            raise InputError(f"{where} has no label column {opts.label_column!r} ({opts.KEY}.label_column; "
                             f"columns: {header})")
    frames = []
    for i, (src, _, mapping) in enumerate(specs):
        text = tuple(mapping[c] for c in string_ids if c in mapping)
        keep = (opts.label_column,) if i == 0 and opts.label_column else ()
        frames.append(None if src is None else apply_mapping(
            read_frame(src, string_columns=text, header_only=header_only), mapping, keep))
    return InputTables(frames[0], specs[0][1], frames[1], specs[1][1] or "item feature table", frames[2],
                       specs[2][1] or "user feature table")


def ingest_event_log(events: pl.DataFrame | str | Path, *, item_features: pl.DataFrame | str | Path | None = None,
                     user_features: pl.DataFrame | str | Path | None = None, task: str = "click",
                     label_column: str | None = None, positive_threshold: float | None = None,
                     num_negatives: int = 0, target_kind: str | None = None, split: str = "leave_one_out",
                     valid_fraction: float = 0.1, test_fraction: float = 0.1, max_history: int | None = None,
                     default_kind: str = "event", seed: int = 0,
                     cold_items: Sequence | np.ndarray | None = None, duplicates: str = "drop",
                     timestamp_unit: str = "auto", columns: EventColumns | dict[str, str] | None = None,
                     name: str | None = None) -> IngestResult:
    """Builds request rows from an event log: one request per event of ``target_kind`` (default: every event).

    Candidates: the event's item (label from ``label_column``, >= ``positive_threshold`` when given; 1 if
    there is no label column) plus ``num_negatives`` sampled items the user never interacted with (label 0).
    History: :func:`attach_history` over every kind, the last ``max_history`` events per kind, kept as
    slices of the sorted events (``HistorySlices``). Split: ``leave_one_out`` per user by time (ties: log
    order) or ``time`` (global quantiles of request time). ``duplicates``, ``timestamp_unit``: the input
    policies of ``event_input.py``; what they did is in ``IngestResult.counters``. ``columns``: the files'
    own column names (``{"item_id": "movieId"}``, see ``config.EventColumns``). ``name``: how messages
    name the event log (default: its path, or "event log" for a DataFrame). Every option is checked
    (``IngestConfig``) before any file is read; the keyword form of :func:`ingest`.

    ``cold_items`` (raw item ids, item cold-start protocol): their events are dropped from every history,
    every request whose positive is one of them goes to test, the split above runs over the other
    requests, and no negative is drawn from them, so no train/valid row and no history ever shows them.
    """
    opts = IngestConfig(task=task, label_column=label_column, positive_threshold=positive_threshold,
                        num_negatives=num_negatives, target_kind=target_kind, split=split,
                        valid_fraction=valid_fraction, test_fraction=test_fraction, max_history=max_history,
                        default_kind=default_kind, seed=seed, duplicates=duplicates, timestamp_unit=timestamp_unit,
                        columns=EventColumns() if columns is None else columns)
    return ingest(events, opts, item_features=item_features, user_features=user_features, cold_items=cold_items,
                  name=name)


def ingest(events: pl.DataFrame | str | Path, opts: IngestConfig, *,
           item_features: pl.DataFrame | str | Path | None = None,
           user_features: pl.DataFrame | str | Path | None = None, cold_items: Sequence | np.ndarray | None = None,
           maps: IdMaps | None = None, oov_policy: OovPolicy | str = OovPolicy.error,
           name: str | None = None) -> IngestResult:
    """:func:`ingest_event_log` with its options as one checked :class:`IngestConfig` (``data.eventlog`` of
    the command line is one). ``maps``: encode in the id space of a prepared dataset
    (:func:`encode_with_maps`; unknown ids follow ``oov_policy``), every request a test row (rows for a
    trained model to score; the split options are not used); side tables are then not read."""
    if maps is not None and (item_features is not None or user_features is not None or cold_items is not None):
        raise InputError("a log encoded with stored id maps takes categories and user features from the maps and "
                         "holds no item out: item_features, user_features and cold_items must not be given")
    t0 = time.perf_counter()
    string_ids = () if maps is None else tuple(c for c, t in (("user_id", "users"), ("item_id", "items"))
                                               if maps.raw_dtype(t) == pl.String)
    tables = read_tables(events, item_features, user_features, opts, name, string_ids)
    where = tables.where
    checked = check_events(tables.events, where, unit=opts.timestamp_unit, duplicates=opts.duplicates)
    # labels converted on the table as read, so a refusal names the row of the file
    labels = None if opts.label_column is None else \
        label_values(tables.events[opts.label_column], where)[checked.source_row]
    if maps is None:
        log = encode_event_log(checked.frame, item_features=tables.items, default_kind=opts.default_kind,
                               item_table=tables.item_table, name=where)
    else:
        log = encode_with_maps(checked.frame, maps, OovPolicy(oov_policy), default_kind=opts.default_kind,
                               name=where)
    ev = log.events
    target = ev if opts.target_kind is None else ev.filter(pl.col("kind") == opts.target_kind)
    if len(target) == 0:
        raise InputError(f"{where} has no rows: no event to turn into requests" if len(ev) == 0 else
                         f"no event of kind {opts.target_kind!r} in {where} to turn into requests "
                         f"(kinds present: {log.kinds})")
    t_encode = time.perf_counter()

    cold_event, cold_dense = cold_item_events(cold_items, checked.frame["item_id"], ev)
    req_user, req_ts, req_order, codes = request_split(target, cold_event, opts)
    if maps is not None:  # rows in a trained id space are scored or evaluated, not trained on
        codes[:] = SPLIT_CODES["test"]
    pos_label = positive_labels(labels, req_order, checked, opts, where)
    cand_cols = candidate_columns(req_user, ev["item_id"].to_numpy()[req_order], pos_label, log, opts, cold_dense)
    schema, per_user, id_maps = schema_and_maps(log, tables, maps, opts, where)
    cols: RequestColumns = {
        "request_id": np.arange(len(req_user), dtype=np.int64),
        "user_id": req_user,
        "request_ts": req_ts,
        **{feat: values[req_user] for feat, values in per_user.items()},
        **attach_history(ev.filter(pl.Series(~cold_event)), req_user, req_ts, log.kinds,
                         max_history=opts.max_history, lazy=True),
        **cand_cols,
    }
    t_done = time.perf_counter()
    return IngestResult(schema, cols, codes, {"encode_s": t_encode - t0, "build_rows_s": t_done - t_encode},
                        cold_dense, {**checked.counters, **log.counters}, id_maps)


def schema_and_maps(log: EventLog, tables: InputTables, maps: IdMaps | None, opts: IngestConfig, where: str
                    ) -> tuple[DataSchema, dict[str, np.ndarray], IdMaps]:
    """The rows' schema, ``{sparse feature: [users + 1] value per dense user id}`` and the id maps: built
    from this log and its user table, or (``maps`` given) the stored schema and maps, extended by new users."""
    if maps is not None:
        per_user, id_maps = stored_features(maps, log)
        return maps.schema, per_user, id_maps
    specs, per_user, vocabs = user_feature_columns(tables.users, log.user_vocab, tables.user_table)
    try:
        schema = DataSchema(sparse=specs, dense=[], sequences=log.kinds, tasks=[opts.task],
                            num_items=log.num_items, num_categories=log.num_categories,
                            num_actions=log.num_actions, has_true_prob=False)
    except ValueError as e:  # a kind / task / user-feature name the column names cannot hold
        raise InputError(f"{where}: {e} (sequence kinds come from column 'kind', the task from {opts.KEY}.task, "
                         "sparse features from the user table's columns)") from e
    return schema, per_user, log.id_maps(per_user, vocabs)


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
