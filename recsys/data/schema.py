"""The data contract: one Parquet row per request.

A *request* is (a user, a request time, that user's behaviour history strictly
before the request time, user/context features, and a list of candidate items
with their labels). Every stage downstream (loader, tokenizer, ranker, scoring
job) reads this one contract; it is declared here once and validated on read.

Columns of a request row (``S`` = a behaviour-sequence kind, ``T`` = a task)::

    request_id          int64                 unique per file set
    user_id             int64                 >= 0
    request_ts          int64                 seconds; every history event is strictly earlier
    <sparse.name>       int64                 one id per user/context sparse feature
    <dense name>        float32               one value per dense feature, finite (float64 accepted: cast on read)
    seq_<S>_item_id     list<int64>           behaviour sequence S, oldest first
    seq_<S>_category    list<int64>           item side info, same length
    seq_<S>_action      list<int64>           action type / strength (e.g. rating), same length
    seq_<S>_ts          list<int64>           event time, non-decreasing, < request_ts
    cand_item_id        list<int64>           candidates of this request (>= 1 each)
    cand_category       list<int64>           same length as cand_item_id
    cand_label_<T>      list<float32>         0/1 label per candidate, same length
    cand_prob_<T>       list<float32>         (synthetic data only) the true click probability

Id conventions: id ``0`` of every table is reserved for *unknown / out of
vocabulary*; real ids are ``1 .. num_embeddings - 1``. A negative id is always an
error; an id ``>= num_embeddings`` follows ``DataSchema.oov_policy`` (``error``
raises naming file, row group and column; ``oov`` maps it to 0).
Empty histories are allowed (a new user). A request with zero candidates is an
error (there is nothing to rank or learn from).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import pyarrow as pa

OOV_ID = 0  # reserved row of every embedding table


@dataclass
class SparseFeature:
    """One user/context categorical feature stored as a scalar int64 column."""

    name: str
    """Column name, also the torchrec feature name."""
    num_embeddings: int
    """Table size; valid ids are 1..num_embeddings-1, 0 is OOV."""

    def __post_init__(self) -> None:
        if self.num_embeddings < 2:
            raise ValueError(f"sparse feature {self.name!r}: num_embeddings must be >= 2, got {self.num_embeddings}")


@dataclass
class DataSchema:
    """Declares every column of a request-row Parquet file set.

    The same object sizes the embedding tables of the model, so a checkpoint and
    the data it scores always agree on vocabularies.
    """

    sparse: list[SparseFeature] = field(default_factory=list)
    """User / context sparse features (scalar int64 columns)."""
    dense: list[str] = field(default_factory=list)
    """Dense float feature columns."""
    sequences: list[str] = field(default_factory=lambda: ["click"])
    """Behaviour-sequence kinds; each kind S has the four ``seq_S_*`` list columns."""
    tasks: list[str] = field(default_factory=lambda: ["click"])
    """Label names; each task T has a ``cand_label_T`` list column."""
    num_items: int = 1000
    """Item-id table size (ids 1..num_items-1)."""
    num_categories: int = 16
    """Category table size."""
    num_actions: int = 8
    """Action-type table size."""
    has_true_prob: bool = False
    """True for synthetic data: ``cand_prob_T`` columns hold the planted probability."""
    oov_policy: Literal["error", "oov"] = "error"
    """What an id >= table size does: raise, or map to the OOV row 0."""

    def __post_init__(self) -> None:
        if not self.sequences:
            raise ValueError("schema needs at least one behaviour sequence kind")
        if not self.tasks:
            raise ValueError("schema needs at least one task")
        if self.oov_policy not in ("error", "oov"):
            raise ValueError(f"oov_policy must be 'error' or 'oov', got {self.oov_policy!r}")
        for what, group in (("sequence kind", self.sequences), ("task", self.tasks),
                            ("sparse feature", [f.name for f in self.sparse]), ("dense feature", self.dense)):
            for n in group:  # names become torch module / torchrec feature keys, where "." is the separator
                if not isinstance(n, str) or not n or "." in n:
                    raise ValueError(f"{what} name {n!r} must be a non-empty string without '.'")
        for what, group in (("sequence kinds", self.sequences), ("tasks", self.tasks)):
            if len(set(group)) != len(group):
                raise ValueError(f"{what} used twice: {sorted({n for n in group if group.count(n) > 1})}")
        names = [f.name for f in self.sparse] + list(self.dense)
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"feature names used twice: {sorted(dup)}")
        for n, v in (("num_items", self.num_items), ("num_categories", self.num_categories),
                     ("num_actions", self.num_actions)):
            if v < 2:
                raise ValueError(f"{n} must be >= 2, got {v}")

    # ---- column names -------------------------------------------------------------
    @staticmethod
    def seq_col(kind: str, field_name: str) -> str:
        return f"seq_{kind}_{field_name}"

    SEQ_FIELDS: tuple[str, ...] = ("item_id", "category", "action", "ts")
    CAND_ID_FIELDS: tuple[str, ...] = ("item_id", "category")

    def table_size(self, field_name: str) -> int:
        """Table size of a sequence / candidate id field (``item_id``, ``category``, ``action``)."""
        return {"item_id": self.num_items, "category": self.num_categories, "action": self.num_actions}[field_name]

    def arrow_schema(self) -> pa.Schema:
        """The exact Arrow schema a writer must produce (readers accept any float width for dense)."""
        fields = [pa.field("request_id", pa.int64()), pa.field("user_id", pa.int64()),
                  pa.field("request_ts", pa.int64())]
        fields += [pa.field(f.name, pa.int64()) for f in self.sparse]
        fields += [pa.field(d, pa.float32()) for d in self.dense]
        for kind in self.sequences:
            fields += [pa.field(self.seq_col(kind, f), pa.list_(pa.int64())) for f in self.SEQ_FIELDS]
        fields += [pa.field(f"cand_{f}", pa.list_(pa.int64())) for f in self.CAND_ID_FIELDS]
        fields += [pa.field(f"cand_label_{t}", pa.list_(pa.float32())) for t in self.tasks]
        if self.has_true_prob:
            fields += [pa.field(f"cand_prob_{t}", pa.list_(pa.float32())) for t in self.tasks]
        return pa.schema(fields)

    # ---- persistence (written beside the data as schema.json) --------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> DataSchema:
        """Parses :meth:`to_json` output; wrong structure -> ``ValueError`` naming the key (see :meth:`from_dict`)."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, raw: object) -> DataSchema:
        """A schema from its JSON object, every key and type checked first: a hand-written or damaged
        schema.json fails here with the key at fault rather than deep inside a reader."""
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object of schema fields, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(_JSON_FIELDS))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} (known: {sorted(_JSON_FIELDS)})")
        missing = [k for k in _JSON_REQUIRED if k not in raw]
        if missing:  # a default here would silently size the tables / name the columns
            raise ValueError(f"missing key(s) {missing}: table sizes and column names must be stated")
        for key, (check, want) in _JSON_FIELDS.items():
            if key in raw and not check(raw[key]):
                raise ValueError(f"key {key!r} = {repr(raw[key])[:80]}: expected {want}")
        for key in ("SEQ_FIELDS", "CAND_ID_FIELDS"):  # written by to_json, fixed by the contract
            if key in raw and tuple(raw[key]) != getattr(cls, key):
                raise ValueError(f"key {key!r} = {raw[key]!r}: must be {list(getattr(cls, key))} (fixed by the contract)")
        fields = {k: v for k, v in raw.items() if k not in ("SEQ_FIELDS", "CAND_ID_FIELDS")}
        fields["sparse"] = [SparseFeature(**f) for f in raw.get("sparse", [])]
        return cls(**fields)


def _str_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _sparse_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(f, dict) and set(f) == {"name", "num_embeddings"}
                                       and isinstance(f["name"], str) and _int(f["num_embeddings"]) for f in v)


_STR_LIST = (_str_list, "a list of strings")
_INT = (_int, "an integer")
_JSON_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "sparse": (_sparse_list, 'a list of {"name": str, "num_embeddings": int}'), "dense": _STR_LIST,
    "sequences": _STR_LIST, "tasks": _STR_LIST, "num_items": _INT, "num_categories": _INT, "num_actions": _INT,
    "has_true_prob": (lambda v: isinstance(v, bool), "true or false"),
    "oov_policy": (lambda v: v in ("error", "oov"), '"error" or "oov"'),
    "SEQ_FIELDS": _STR_LIST, "CAND_ID_FIELDS": _STR_LIST}
"""Keys of schema.json: (check of the value's type, what is expected)."""
_JSON_REQUIRED = ("sequences", "tasks", "num_items", "num_categories", "num_actions")
"""Keys schema.json must hold (the others have safe defaults: no sparse / dense features, no true prob)."""
