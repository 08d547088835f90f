"""`RequestBatch`: what the loader yields and the ranker consumes.

Shape legend: ``B`` requests in the batch, ``L_b`` history length of request b for a
sequence kind, ``C_b`` candidates of request b, ``T`` tasks.

Example, one sequence kind ``click``, B=2: request 0 has history items [7, 3] and
candidates [11, 12, 13]; request 1 has an empty history and candidate [5]::

    seq["click.item_id"].values()   = [7, 3]        lengths = [2, 0]   offsets = [0, 2, 2]
    seq_ts["click"].values()        = [100, 160]    (same lengths)
    cand["item_id"].values()        = [11, 12, 13, 5]  lengths = [3, 1]
    cand_offsets                    = [0, 3, 4]
    labels                          = [[1.], [0.], [0.], [1.]]   # [sum C_b, T]
    id_features.keys()              = ["click.item_id", "click.category", "click.action", "click.time_gap",
                                       "cand.item_id", "cand.category", "req.recency"]
    sizes.seq_lengths["click"]      = (2, 0)      sizes.cand_counts = (3, 1)   # Python ints

``id_features`` (built by ``collate``, see ``recsys.data.id_features``) is what the tokenizer's
``EmbeddingCollection`` reads as it is, and ``sparse`` what its ``EmbeddingBagCollection`` reads:
both are attributes of the batch, which is the shape torchrec's ``TrainPipelineSparseDist``
needs to start their input all-to-all one batch ahead. ``sizes`` holds every size the forward
needs as Python ints, so the forward never reads one back from a tensor.

``collate`` hands both in (``prebuilt``); a batch built otherwise (tests, ``dataclasses.replace``,
serving's candidate slices) derives them from its other fields in ``__post_init__`` (reading
lengths back once, on the data side), so they never go stale.
"""

from __future__ import annotations

import copy
from dataclasses import InitVar, dataclass, field, fields

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from recsys.data.id_features import TIME_GAP_BUCKETS, build_id_features, keyed_jagged


@dataclass(frozen=True)
class BatchSizes:
    """Sizes of a batch as Python ints (known to the loader; the forward reads them instead of tensors)."""

    seq_lengths: dict[str, tuple[int, ...]]
    """Per kind (schema order), ``L_bk`` of every request after truncation."""
    cand_counts: tuple[int, ...]
    """``C_b`` of every request."""
    long_lengths: tuple[int, ...] | None = None
    """Events of every request's long history (``long_seq``), or None without one."""

    @property
    def num_requests(self) -> int:
        return len(self.cand_counts)

    def total(self, kind: str) -> int:
        """``sum_b L_bk``: events of kind ``kind`` in the batch."""
        return sum(self.seq_lengths[kind])

    def max_len(self) -> int:
        """Longest history of any kind (0 for an empty batch)."""
        return max((max(v, default=0) for v in self.seq_lengths.values()), default=0)

    def s_lengths(self, extra_per_kind: int = 0) -> tuple[int, ...]:
        """S tokens of every request: its events of all kinds, plus ``extra_per_kind`` per kind (SEP tokens)."""
        per_kind = list(self.seq_lengths.values())
        extra = extra_per_kind * len(per_kind)
        return tuple(sum(col) + extra for col in zip(*per_kind)) if per_kind else (extra,) * self.num_requests

    @classmethod
    def of(cls, seq_ts: KeyedJaggedTensor, cand_offsets: torch.Tensor,
           long_seq: KeyedJaggedTensor | None = None) -> BatchSizes:
        """Read back from a batch's tensors (one host sync; the loader computes them in numpy instead)."""
        b = int(cand_offsets.numel()) - 1
        lengths = seq_ts.lengths().view(len(seq_ts.keys()), b).tolist() if seq_ts.keys() else []
        long_lengths = None
        if long_seq is not None:
            long_lengths = tuple(long_seq.lengths()[:b].tolist())
        return cls({k: tuple(v) for k, v in zip(seq_ts.keys(), lengths)},
                   tuple(cand_offsets.diff().tolist()), long_lengths)


def derive_id_features(seq: KeyedJaggedTensor, seq_ts: KeyedJaggedTensor, cand: KeyedJaggedTensor,
                       request_ts: torch.Tensor, buckets: int) -> KeyedJaggedTensor:
    """``RequestBatch.id_features`` from a batch's KJTs (the data-side fallback of ``collate``)."""
    kinds = list(seq_ts.keys())
    s, t, c = seq.to_dict(), seq_ts.to_dict(), cand.to_dict()
    keys, values, lengths = build_id_features(
        kinds, {k: jt.values() for k, jt in s.items()}, {k: t[k].lengths() for k in kinds},
        {k: t[k].values() for k in kinds}, {k: jt.values() for k, jt in c.items()}, c["item_id"].lengths(),
        request_ts, buckets)
    return keyed_jagged(keys, values, lengths)


@dataclass
class RequestBatch(Pipelineable):
    request_id: torch.Tensor
    """[B] int64."""
    user_id: torch.Tensor
    """[B] int64."""
    request_ts: torch.Tensor
    """[B] int64, seconds."""
    sparse: KeyedJaggedTensor
    """User/context sparse features; keys = schema sparse names, one id per request (lengths all 1)."""
    dense: torch.Tensor
    """[B, n_dense] float32 (n_dense may be 0)."""
    seq: KeyedJaggedTensor
    """Behaviour id features; keys ``"<kind>.item_id"``, ``"<kind>.category"``, ``"<kind>.action"``
    for each kind; lengths [B] per key = history length after truncation (oldest first)."""
    seq_ts: KeyedJaggedTensor
    """Event timestamps; keys = kinds; same lengths as ``seq``'s keys of that kind. int64 seconds."""
    cand: KeyedJaggedTensor
    """Candidate id features; keys ``"item_id"``, ``"category"``; lengths [B] = C_b (>= 1)."""
    cand_offsets: torch.Tensor
    """[B+1] int64: candidates of request b are rows cand_offsets[b]:cand_offsets[b+1]."""
    labels: torch.Tensor
    """[sum C_b, T] float32 in {0, 1}."""
    true_prob: torch.Tensor | None = None
    """[sum C_b, T] float32, planted probabilities (synthetic data only)."""
    long_seq: KeyedJaggedTensor | None = None
    """Long history (``loader.long_max_len > 0`` only; see ``recsys.longseq``): keys ``"item_id"``,
    ``"category"``, ``"action"``, ``"ts"``, ``"kind"`` (index into the schema's kinds) and
    ``"in_window"`` (1 if the event is also an S token in ``seq``); lengths [B] per key. Per request,
    each kind's last ``long_max_len`` events, kind-major (schema order), oldest first inside a kind."""
    prior: torch.Tensor | None = None
    """[sum C_b] float32: a logit offset of every candidate, added to each task's ranker logit (a retriever's
    score: ``train.hard_negatives.prior``, the cascade of such a ranker); None = none."""
    prebuilt: InitVar[tuple[KeyedJaggedTensor, BatchSizes] | None] = None
    """``(id_features, sizes)`` as ``collate`` built them; None: derived from the fields above. Not copied
    by ``dataclasses.replace``, so a replaced batch always re-derives them from its own fields."""
    time_gap_buckets: int = TIME_GAP_BUCKETS
    """Bucket count of the time gaps in ``id_features`` (must equal ``model.time_gap_buckets``)."""
    id_features: KeyedJaggedTensor = field(init=False)
    """Every id the sequence tables look up (``recsys.data.id_features``): per kind item/category/action/
    time-gap bucket, the candidates' item/category, the request's recency bucket."""
    sizes: BatchSizes = field(init=False)
    """Python-int sizes (:class:`BatchSizes`)."""

    def __post_init__(self, prebuilt: tuple[KeyedJaggedTensor, BatchSizes] | None) -> None:
        if prebuilt is not None:
            self.id_features, self.sizes = prebuilt
            return
        self.id_features = derive_id_features(self.seq, self.seq_ts, self.cand, self.request_ts, self.time_gap_buckets)
        self.sizes = BatchSizes.of(self.seq_ts, self.cand_offsets, self.long_seq)
        for kjt in (self.sparse, self.seq, self.seq_ts, self.cand, self.long_seq):
            if kjt is not None and kjt.keys():
                kjt.length_per_key()  # computed (and kept by the KJT) here, not in the forward

    def with_prior(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [sum C_b, T]`` plus :attr:`prior` on every task (unchanged when there is none)."""
        return logits if self.prior is None else logits + self.prior.to(logits.dtype)[:, None]

    @property
    def num_requests(self) -> int:
        return int(self.request_id.numel())

    @property
    def num_candidates(self) -> int:
        return int(self.labels.shape[0])

    def _streamables(self) -> dict[str, torch.Tensor | KeyedJaggedTensor]:
        """The tensor / KJT fields that are set (``sizes`` and ``time_gap_buckets`` are host values)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (torch.Tensor, KeyedJaggedTensor)):
                out[f.name] = v
        return out

    def _with(self, fields_: dict[str, torch.Tensor | KeyedJaggedTensor]) -> RequestBatch:
        out = copy.copy(self)  # not dataclasses.replace: nothing is re-derived
        for name, value in fields_.items():
            setattr(out, name, value)
        return out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RequestBatch:
        """``torchrec.streamable.Pipelineable``: every tensor moved; the Python sizes kept."""
        return self._with({n: v.to(device, non_blocking=non_blocking) for n, v in self._streamables().items()})

    def record_stream(self, stream: torch.Stream) -> None:
        """``Pipelineable``: marks every tensor as used by ``stream`` (the pipeline's compute stream)."""
        for v in self._streamables().values():
            v.record_stream(stream)

    def pin_memory(self) -> RequestBatch:
        return self._with({n: v.pin_memory() for n, v in self._streamables().items()})
