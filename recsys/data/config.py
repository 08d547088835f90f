"""Structured (Hydra / OmegaConf) configs of the data stage.

Plain dataclasses; every field has a one-line docstring and is checked in
``__post_init__``. Fixed choices are ``str``-valued enums rather than ``Literal``:
OmegaConf 2.3 rejects ``Literal`` annotations ("Unexpected type annotation"), while
an enum is validated at merge time, so a typo in a YAML file or an override fails at
start-up. The enums subclass ``str``, so ``cfg.source == "synthetic"`` holds.

YAML files under ``configs/data/`` fill a :class:`DataConfig`::

    base = OmegaConf.structured(DataConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.load("configs/data/tiny.yaml")))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from numbers import Integral, Real
from pathlib import Path
from typing import ClassVar

from recsys.errors import InputError

TIME_GAP_BUCKETS = 32
"""Default bucket count (``model.time_gap_buckets``); the loader and the model must agree. Here, not in
``recsys.data.id_features`` (which re-exports it), so that the model config reads it without torch."""


class DataSource(str, Enum):
    """Where request rows come from."""

    synthetic = "synthetic"
    ml100k = "ml100k"
    eventlog = "eventlog"
    parquet = "parquet"


class HistoryDist(str, Enum):
    """Heavy-tailed law of a synthetic user's number of events."""

    lognormal = "lognormal"
    pareto = "pareto"


class OovPolicy(str, Enum):
    """What an id >= its table size does on read (see ``DataSchema.oov_policy``)."""

    error = "error"
    oov = "oov"


class DuplicatePolicy(str, Enum):
    """What ingest does with exact duplicate events (rows equal in every column of the event log)."""

    drop = "drop"
    keep = "keep"
    error = "error"


class TimestampUnit(str, Enum):
    """Unit of a numeric ``timestamp`` column; ``auto`` infers it from the magnitude (see ``event_input.py``)."""

    s = "s"
    ms = "ms"
    us = "us"
    ns = "ns"
    auto = "auto"


class IngestSplit(str, Enum):
    """How ingest splits request rows into train / valid / test."""

    leave_one_out = "leave_one_out"
    time = "time"


def _choice(enum: type[Enum], value: object, key: str) -> Enum:
    """``enum(value)``, or an ``InputError`` naming the key, the value and the choices."""
    try:
        return enum(value)
    except ValueError:
        raise InputError(f"{key} must be one of {', '.join(m.value for m in enum)}; got {value!r}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


@dataclass
class EventColumns:
    """Which column of the input files holds each field ingest reads, so files keep their own names
    (``movieId``, ``userId``, ``ts``...) and are never rewritten. A mapped column is read under the
    standard name; the file's other columns (a label column, for one) keep their names."""

    user_id: str = "user_id"
    """Column of the user id, in the event log and in the user feature table."""
    item_id: str = "item_id"
    """Column of the item id, in the event log and in the item feature table."""
    timestamp: str = "timestamp"
    """Event log column of the event time."""
    action: str | None = None
    """Event log column of the action (type or strength); None: a column named ``action`` if there is one."""
    kind: str | None = None
    """Event log column of the behaviour kind; None: a column named ``kind`` if there is one."""
    category: str = "category"
    """Item feature table column of the item's category."""

    EVENT_FIELDS: ClassVar[tuple[str, ...]] = ("user_id", "item_id", "timestamp", "action", "kind")
    """Fields read from the event log (``category``: item table; user_id / item_id: side tables too)."""

    def mapping(self, names: tuple[str, ...]) -> dict[str, str]:
        """``{standard name: file column}`` of the fields in ``names`` that are set."""
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass
class IngestConfig:
    """Options of ``recsys.data.ingest.ingest_event_log``, checked before any file is read."""

    KEY: ClassVar[str] = "ingest"
    """How messages name these options (``ingest.<field>``; ``data.eventlog.<field>`` on the command line)."""

    task: str = "click"
    """Task name: the label column of the rows is ``cand_label_<task>``."""
    label_column: str | None = None
    """Event-log column holding the label (None: every event is a positive)."""
    positive_threshold: float | None = None
    """A label >= this is a positive (None: the label must be 0/1)."""
    num_negatives: int = 0
    """Sampled items per request that the user never interacted with (label 0)."""
    target_kind: str | None = None
    """Only events of this kind become requests (None: every event)."""
    split: IngestSplit = IngestSplit.leave_one_out
    """leave_one_out (per user by time) or time (global quantiles of request time)."""
    valid_fraction: float = 0.1
    """split=time: share of requests (latest before test) in valid."""
    test_fraction: float = 0.1
    """split=time: share of requests (latest in time) in test."""
    max_history: int | None = None
    """Most recent events kept per kind in each history (None: all; bounds the output size)."""
    default_kind: str = "event"
    """Behaviour kind of every event when the log has no ``kind`` column."""
    seed: int = 0
    """Seed of the negative sampling."""
    duplicates: DuplicatePolicy = DuplicatePolicy.drop
    """Exact duplicate events: drop (keep the first, count them), keep, or error."""
    timestamp_unit: TimestampUnit = TimestampUnit.auto
    """Unit of a numeric timestamp column: s, ms, us, ns, or auto (inferred from the magnitude)."""
    columns: EventColumns = field(default_factory=EventColumns)
    """Input column names (``columns.item_id=movieId``...); the defaults are the standard names."""

    def __post_init__(self) -> None:
        k = self.KEY
        self.split = _choice(IngestSplit, self.split, f"{k}.split")
        self.duplicates = _choice(DuplicatePolicy, self.duplicates, f"{k}.duplicates")
        self.timestamp_unit = _choice(TimestampUnit, self.timestamp_unit, f"{k}.timestamp_unit")
        if not _is_int(self.num_negatives) or self.num_negatives < 0:
            raise InputError(f"{k}.num_negatives must be an integer >= 0, got {self.num_negatives!r}")
        if self.max_history is not None and (not _is_int(self.max_history) or self.max_history < 1):
            raise InputError(f"{k}.max_history must be None (keep all) or an integer >= 1, "
                             f"got {self.max_history!r}")
        if not _is_int(self.seed):
            raise InputError(f"{k}.seed must be an integer, got {self.seed!r}")
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value < 1.0:
                raise InputError(f"{k}.{name} must be a number in [0, 1), got {value!r}")
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise InputError(f"{k}.valid_fraction + {k}.test_fraction must be < 1 (some rows must stay in "
                             f"train), got {self.valid_fraction} + {self.test_fraction} = "
                             f"{self.valid_fraction + self.test_fraction:g}")
        if self.positive_threshold is not None and (
                isinstance(self.positive_threshold, bool) or not isinstance(self.positive_threshold, Real)
                or not math.isfinite(self.positive_threshold)):
            raise InputError(f"{k}.positive_threshold must be None or a finite number, "
                             f"got {self.positive_threshold!r}")
        for name in ("task", "default_kind"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InputError(f"{k}.{name} must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("label_column", "target_kind"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InputError(f"{k}.{name} must be None or a non-empty string, got {value!r}")
        self._check_columns()

    def _check_columns(self) -> None:
        """``columns`` as an :class:`EventColumns` (a mapping is accepted), every name a non-empty string."""
        if isinstance(self.columns, Mapping):
            known = {f.name for f in fields(EventColumns)}
            unknown = sorted(set(self.columns) - known)
            if unknown:
                raise InputError(f"{self.KEY}.columns: unknown field(s) {unknown}; the fields are "
                                 f"{sorted(known)}")
            self.columns = EventColumns(**self.columns)
        for f in fields(EventColumns):
            value = getattr(self.columns, f.name)
            optional = f.name in ("action", "kind")
            if (value is None and not optional) or (value is not None and (not isinstance(value, str) or not value)):
                raise InputError(f"{self.KEY}.columns.{f.name} must be a non-empty column name"
                                 f"{' (or None)' if optional else ''}, got {value!r}")


@dataclass
class EventLogConfig(IngestConfig):
    """``data.source=eventlog``: your own event log (CSV / TSV / Parquet) ingested by ``ingest_event_log``.

    Every ingest option is a field (inherited from :class:`IngestConfig`); the files are named here.
    The cache key holds the SHA-256 of every input file (``prepare.config_key``), so a changed log is
    ingested again and a copied or touched one is not.
    """

    KEY: ClassVar[str] = "data.eventlog"

    events: str | None = None
    """The event log: ``.csv`` (comma), ``.parquet``, anything else tab-separated (``.tsv``)."""
    item_features: str | None = None
    """Optional item table: item id + category columns (names from ``columns``)."""
    user_features: str | None = None
    """Optional user table: user id + categorical columns (each becomes a sparse feature)."""
    cold_items: list[str] = field(default_factory=list)
    """Raw item ids held out as cold-start items (test only; cast to the log's id type)."""
    id_maps_from: str | None = None
    """A prepared eventlog dataset directory: encode this log with *its* id maps and schema (a new log
    of the same catalog, e.g. to score with that dataset's checkpoint); unknown ids follow
    ``data.oov_policy``. Categories and user features then come from the stored maps."""

    def input_files(self) -> dict[str, str]:
        """``{field: path}`` of the input files that are set."""
        return {n: getattr(self, n) for n in ("events", "item_features", "user_features")
                if getattr(self, n) is not None}

    def check_files(self) -> None:
        """Every input file set exists (made absolute, so a checkpoint's config finds them from any
        directory); ``id_maps_from`` is a prepared dataset with id maps, and the tables it replaces are
        not set. Raises ``InputError`` naming the key and the value."""
        if not self.events:
            raise InputError(f"data.source=eventlog needs {self.KEY}.events=<file.csv|.tsv|.parquet> (the event "
                             "log: user id, item id, timestamp columns; see configs/data/eventlog.yaml)")
        for name, value in self.input_files().items():
            path = Path(value)
            if not path.is_file():
                what = "is not a file" if path.exists() else "does not exist"
                raise InputError(f"{self.KEY}.{name}={value} {what}")
            setattr(self, name, str(path.resolve()))
        if self.id_maps_from is None:
            return
        base = Path(self.id_maps_from)
        if not (base / "schema.json").is_file() or not (base / "id_maps").is_dir():
            raise InputError(f"{self.KEY}.id_maps_from={self.id_maps_from} is not a prepared eventlog dataset "
                             "(it needs schema.json and id_maps/: a directory python -m recsys.data data=eventlog "
                             "wrote)")
        self.id_maps_from = str(base.resolve())
        for name in ("item_features", "user_features"):
            if getattr(self, name) is not None:
                raise InputError(f"{self.KEY}.{name} is set, but {self.KEY}.id_maps_from={self.id_maps_from} "
                                 "takes categories and user features from the stored id maps: drop it")
        if self.cold_items:
            raise InputError(f"{self.KEY}.cold_items is set, but a log encoded with {self.KEY}.id_maps_from has "
                             "no training split to hold items out of: drop it")


SYNTHETIC_TASKS = ("click", "like")


@dataclass
class SyntheticConfig:
    """Synthetic event log + impressions with a planted, known click model (see ``synthetic.py``)."""

    seed: int = 0
    """Seed of every random draw; same seed -> byte-identical Parquet content."""
    num_users: int = 2500
    """Number of users."""
    num_items: int = 5000
    """Item catalog size (ids 1..num_items; the schema's table has num_items + 1 rows)."""
    num_categories: int = 32
    """Number of item categories (ids 1..num_categories)."""
    sequences: list[str] = field(default_factory=lambda: ["click", "like", "purchase"])
    """Behaviour kinds; the first one carries the planted signal."""
    kind_rates: list[float] = field(default_factory=lambda: [0.8, 0.15, 0.05])
    """Share of events of each kind (same length as ``sequences``, decreasing, sums to 1)."""
    num_actions: int = 8
    """Action table size; event actions (dwell / strength buckets) use ids 1..num_actions-1."""
    requests_per_user: float = 12.0
    """Mean number of requests (impressions) per user (1 + Poisson(mean - 1))."""
    candidates_per_request: int = 16
    """Candidates per request."""
    history_dist: HistoryDist = HistoryDist.lognormal
    """Law of a user's total event count."""
    history_median: float = 40.0
    """Median events per user (lognormal) / scale x_m (Pareto)."""
    history_sigma: float = 2.0
    """Lognormal sigma of the event count (tail weight)."""
    history_pareto_alpha: float = 1.1
    """Pareto tail index (used when history_dist = pareto)."""
    max_history: int = 10000
    """Cap on a user's total events (>= 10000 keeps a few very long users)."""
    time_span_days: float = 120.0
    """All events and requests fall in this many days."""
    zipf_exponent: float = 1.0
    """Item popularity ~ 1 / rank^exponent."""
    preference_concentration: float = 0.3
    """Dirichlet alpha of a user's category preference (smaller = more focused users)."""
    stickiness: float = 0.6
    """Probability that an event repeats the previous event's category (short-term interest)."""
    candidate_pref_fraction: float = 0.5
    """Share of candidates drawn from the user's preferred categories (rest: by popularity)."""
    signal_window: int = 50
    """The planted model looks at the last this many events of the first kind (keep <= loader.max_len)."""
    click_bias: float = -3.0
    """Intercept of the click logit."""
    w_affinity: float = 1.0
    """Weight of log(share of the candidate's category in the recent history / uniform share)."""
    w_recency: float = 1.2
    """Weight of exp(-events since the candidate's category last appeared / recency_scale)."""
    recency_scale: float = 5.0
    """Decay (in events) of the recency term."""
    w_popularity: float = 0.4
    """Weight of the standardized log popularity of the candidate item."""
    w_user_feature: float = 0.6
    """Std of the planted (age bucket x category) effect."""
    like_bias: float = -0.5
    """Intercept of the like-given-click logit."""
    w_like_quality: float = 1.2
    """Weight of the hidden per-item quality in the like-given-click logit."""
    w_like_affinity: float = 0.5
    """Weight of the affinity term in the like-given-click logit."""
    tasks: list[str] = field(default_factory=lambda: ["click", "like"])
    """Label columns: "click" and optionally "like" (like implies click)."""
    valid_fraction: float = 0.1
    """Share of requests (latest in time, before test) in the valid split."""
    test_fraction: float = 0.1
    """Share of requests (latest in time) in the test split."""
    cold_item_fraction: float = 0.0
    """Share of items held out as cold-start items: in no event and no train/valid candidate, only
    among test candidates (0 = off; left out of the data cache key while 0, see prepare.config_key)."""
    long_range_weight: float = 0.0
    """Planted long-range term of the click logit: + weight x 1[the candidate's category appears among
    the first kind's events older than its last ``long_range_window`` ones, and not among those]
    (0 = off; issue 7; left out of the data cache key while at its default)."""
    long_range_window: int = 32
    """Recent events of the first kind that the long-range term looks *past* (match loader.max_len)."""

    def __post_init__(self) -> None:
        self.history_dist = HistoryDist(self.history_dist)
        for name in ("num_users", "num_items", "num_categories", "candidates_per_request", "signal_window"):
            if getattr(self, name) < 1:
                raise InputError(f"synthetic.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_actions < 3:
            raise InputError(f"synthetic.num_actions must be >= 3, got {self.num_actions}")
        if not self.sequences or len(set(self.sequences)) != len(self.sequences):
            raise InputError(f"synthetic.sequences must be non-empty and unique, got {self.sequences}")
        if len(self.kind_rates) != len(self.sequences):
            raise InputError("synthetic.kind_rates needs one rate per sequence kind")
        if any(r <= 0 for r in self.kind_rates) or not math.isclose(sum(self.kind_rates), 1.0, abs_tol=1e-6):
            raise InputError(f"synthetic.kind_rates must be positive and sum to 1, got {self.kind_rates}")
        if self.requests_per_user < 1:
            raise InputError(f"synthetic.requests_per_user must be >= 1, got {self.requests_per_user}")
        if self.history_median <= 0 or self.history_sigma <= 0 or self.history_pareto_alpha <= 0:
            raise InputError("synthetic history distribution parameters must be > 0")
        if self.max_history < 1:
            raise InputError(f"synthetic.max_history must be >= 1, got {self.max_history}")
        for name in ("stickiness", "candidate_pref_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"synthetic.{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.tasks or self.tasks[0] != "click" or any(t not in SYNTHETIC_TASKS for t in self.tasks) \
                or len(set(self.tasks)) != len(self.tasks):
            raise InputError(f"synthetic.tasks must be ['click'] or ['click', 'like'], got {self.tasks}")
        if self.valid_fraction < 0 or self.test_fraction < 0 or self.valid_fraction + self.test_fraction >= 1:
            raise InputError("synthetic.valid_fraction + test_fraction must be in [0, 1)")
        if self.time_span_days <= 0 or self.recency_scale <= 0 or self.preference_concentration <= 0:
            raise InputError("synthetic.time_span_days, recency_scale, preference_concentration must be > 0")
        if self.long_range_window < 1:
            raise InputError(f"synthetic.long_range_window must be >= 1, got {self.long_range_window}")
        if not 0.0 <= self.cold_item_fraction < 1.0:
            raise InputError(f"synthetic.cold_item_fraction must be in [0, 1), got {self.cold_item_fraction}")


@dataclass
class Ml100kConfig:
    """MovieLens-100k as shipped inside the recbole wheel (see ``ml100k.py``)."""

    raw_dir: str | None = None
    """Where the recbole wheel is downloaded and the three files extracted; None -> <root>/raw."""
    recbole_version: str = "1.2.1"
    """recbole release whose wheel carries dataset_example/ml-100k."""
    like_threshold: int = 4
    """A rating >= this is a positive of task "like"."""
    download: bool = True
    """Download the wheel with pip when the files are missing (False: raise instead)."""
    cold_item_fraction: float = 0.0
    """Share of the rated movies held out as cold-start items: in no history and no train/valid row, every
    rating of them a test row (see ``ml100k.py``). 0 = the plain leave-one-out protocol."""
    cold_seed: int = 0
    """Seed of the cold-item draw."""

    def __post_init__(self) -> None:
        if not 1 <= self.like_threshold <= 5:
            raise InputError(f"ml100k.like_threshold must be in 1..5, got {self.like_threshold}")
        if not 0.0 <= self.cold_item_fraction < 1.0:
            raise InputError(f"ml100k.cold_item_fraction must be in [0, 1), got {self.cold_item_fraction}")


@dataclass
class LoaderConfig:
    """How :class:`recsys.data.loader.RequestLoader` streams request rows."""

    batch_size: int = 256
    """Requests per batch (candidates per batch vary)."""
    max_len: int = 256
    """Most recent events kept per sequence kind (older ones are dropped on collate)."""
    long_max_len: int = 0
    """Long history for ``model.long_seq`` (memory / search): the most recent events kept per kind in
    ``RequestBatch.long_seq`` (0 = off; else >= max_len). The S-token window stays ``max_len``."""
    num_workers: int = 0
    """DataLoader worker processes (0 = read in the main process)."""
    shuffle: bool = False
    """Shuffle row-group order (and rows inside a row group), seeded by seed + epoch."""
    seed: int = 0
    """Base seed of the shuffle."""
    drop_last: bool = False
    """Drop each shard's last partial batch."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"loader.batch_size must be >= 1, got {self.batch_size}")
        if self.max_len < 1:
            raise InputError(f"loader.max_len must be >= 1, got {self.max_len}")
        if self.long_max_len and self.long_max_len < self.max_len:
            raise InputError(f"loader.long_max_len must be 0 (off) or >= max_len ({self.max_len}), "
                             f"got {self.long_max_len}")
        if self.num_workers < 0:
            raise InputError(f"loader.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class DataConfig:
    """The ``data`` config group: which dataset, where it lives, how it is read."""

    source: DataSource = DataSource.synthetic
    """synthetic (generated), ml100k (MovieLens-100k), eventlog (your own log), parquet (a prepared directory)."""
    root: str = "data"
    """Prepared datasets land in <root>/<source>-<config hash>/."""
    path: str | None = None
    """Prepared directory (with schema.json) read when source = parquet."""
    row_group_size: int = 1024
    """Requests per Parquet row group (the unit of streaming and sharding)."""
    oov_policy: OovPolicy = OovPolicy.error
    """On read, an id >= its table size raises (error) or becomes id 0 (oov)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Generator settings (source = synthetic)."""
    ml100k: Ml100kConfig = field(default_factory=Ml100kConfig)
    """MovieLens-100k settings (source = ml100k)."""
    eventlog: EventLogConfig = field(default_factory=EventLogConfig)
    """Your own event log and its ingest options (source = eventlog)."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    """Loader settings."""

    def __post_init__(self) -> None:
        self.source = DataSource(self.source)
        self.oov_policy = OovPolicy(self.oov_policy)
        if self.row_group_size < 1:
            raise InputError(f"data.row_group_size must be >= 1, got {self.row_group_size}")
        self._check_path()
        self._check_eventlog()

    def _check_eventlog(self) -> None:
        """``data.eventlog.*`` files are read only with ``source=eventlog``, where they must exist."""
        if self.source == DataSource.eventlog:
            self.eventlog.check_files()
            return
        given = {**self.eventlog.input_files(), **({"id_maps_from": self.eventlog.id_maps_from}
                                                   if self.eventlog.id_maps_from else {})}
        if given:
            name, value = next(iter(given.items()))
            raise InputError(f"data.eventlog.{name}={value} is set, but data.source={self.source.value} does not "
                             "read it (only data.source=eventlog reads data.eventlog.*): drop it, or add "
                             "data.source=eventlog (or data=eventlog)")

    def _check_path(self) -> None:
        """``data.path`` is read only with ``source=parquet``, where it must be an existing directory: a path
        that another source would silently ignore, or one that does not exist, is refused before any work."""
        if self.source != DataSource.parquet:
            if self.path:
                raise InputError(f"data.path={self.path} is set, but data.source={self.source.value} does not read "
                                 "it (only data.source=parquet reads data.path): drop data.path, or add "
                                 "data.source=parquet")
            return
        if not self.path:
            raise InputError("data.source=parquet needs data.path (a prepared directory with schema.json)")
        if not Path(self.path).is_dir():
            what = "is not a directory" if Path(self.path).exists() else "does not exist"
            raise InputError(f"data.path={self.path} {what} (data.source=parquet reads a prepared dataset "
                             "directory: schema.json + train/ valid/ test/)")
