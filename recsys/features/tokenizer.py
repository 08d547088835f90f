"""Unified tokenizer (OneTrans §tokens): one S-token sequence per request, N NS tokens per candidate.

Shape legend: ``B`` requests, ``K`` sequence kinds, ``L_b`` S tokens of request b,
``C_b`` candidates of request b, ``N`` NS tokens per candidate, ``E`` embedding
width, ``D`` model width.

S tokens. Each behaviour event of kind k becomes
``proj_k([item_emb | category_emb | action_emb | time_gap_emb])`` of width D, where the
time gap is the gap to the *previous event of the same kind* in log2 buckets (bucket 0
for the first event). S tokens deliberately depend on nothing but the events themselves,
not on the request time: that is what lets a user's S-token keys/values be cached and
reused by later requests (only appended events are new). How long ago the newest event
happened (``request_ts - newest event``) enters the NS side instead, as a recency
embedding. The K sequences are merged

* ``time_interleaved`` (default): all events of a request sorted by time (ties keep
  kind order), plus a learned kind embedding; or
* ``intent_grouped``: kinds concatenated in schema order, each group followed by a
  learned ``[SEP_k]`` token (present even when the group is empty).

NS tokens. The request's pooled sparse embeddings, (signed-log) dense features, recency
embedding and, optionally (``ns_recent_events``), the embeddings of each kind's R most
recent events, one slot per recency rank (user side), and the candidate's item/category
embeddings (candidate side) become

* ``auto_split`` (default): one MLP over the concatenation, reshaped to N tokens; the
  first layer is split into a user and a candidate half so the user half is computed
  once per request, not once per candidate; with ``ns_cross`` (default) the hidden layer
  also gets an explicit crossing term ``(U user) * (V cand)`` (elementwise), which is
  what user-feature x item-feature effects need and keeps the same per-request split; or
* ``group_wise``: one small MLP per feature group (user sparse + recency, dense,
  candidate), one token each.

Input. Everything the tables look up arrives ready in the batch, built by the loader
(``RequestBatch.id_features``: the events' ids, their time-gap buckets, the candidates' ids and
the request's recency bucket; ``RequestBatch.sparse`` for the pooled features), and every size
the forward needs arrives as Python ints (``RequestBatch.sizes``): the forward reads no size back
from a tensor. ``forward`` is the two torchrec lookups, each called with a batch attribute (what
torchrec's ``TrainPipelineSparseDist`` needs to pipeline them), then :func:`_tokens`, which the
pipeline's fx tracer treats as one opaque call (``torch.fx.wrap``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recsys.data.batch import BatchSizes, RequestBatch
from recsys.data.id_features import id_feature_keys, keyed_jagged
from recsys.data.jagged import keep_last, kept_total, lengths_to_offsets, segment_ids
from recsys.data.schema import DataSchema
from recsys.embeddings.tables import FeatureEmbeddings
from recsys.features.config import NsTokenizer, SeqMerge, TokenizerConfig
from recsys.longseq.features import LongSequenceFeatures
from recsys.longseq.memory import MemoryState

SEQ_FIELDS = ("item_id", "category", "action", "time_gap")
"""Per-kind embeddings concatenated into an S token's input (``[sum L_bk, 4E]``)."""


@dataclass
class TokenizedBatch:
    s_tokens: torch.Tensor
    """[sum L_b, D] S tokens, request-major, oldest first."""
    s_offsets: torch.Tensor
    """[B+1] int64."""
    ns_tokens: torch.Tensor
    """[sum C_b, N, D] NS tokens of every candidate."""
    cand_offsets: torch.Tensor
    """[B+1] int64."""
    s_lengths: tuple[int, ...] | None = None
    """``L_b`` of every request as Python ints (from ``RequestBatch.sizes``; None: read from s_offsets)."""


def signed_log1p(x: torch.Tensor) -> torch.Tensor:
    """Compresses dense features of any scale without fitted statistics."""
    return torch.sign(x) * torch.log1p(x.abs())


class UnifiedTokenizer(nn.Module):
    def __init__(self, schema: DataSchema, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.kinds = list(schema.sequences)
        self.n_dense = len(schema.dense)
        self.cfg = cfg
        d, e = cfg.d_model, cfg.emb_dim
        self.embeddings = FeatureEmbeddings(schema, e, cfg.time_gap_buckets, cfg.item_embedding)
        self.seq_proj = nn.ModuleDict({k: nn.Linear(len(SEQ_FIELDS) * e, d) for k in self.kinds})
        if cfg.seq_merge == SeqMerge.time_interleaved:
            self.kind_emb = nn.Parameter(torch.randn(len(self.kinds), d) * 0.02)
        else:
            self.sep = nn.Parameter(torch.randn(len(self.kinds), d) * 0.02)
        self.recent = cfg.ns_recent_events
        recent_dim = len(self.kinds) * self.recent * e
        user_dim = self.embeddings.pooled_dim + self.n_dense + e + recent_dim  # + recency + recent events
        cand_dim = 2 * e + int(cfg.ns_seen_item)
        self.num_items = schema.num_items
        if cfg.ns_tokenizer == NsTokenizer.auto_split:
            self.n_ns = cfg.n_ns_tokens
            hidden = cfg.n_ns_tokens * d
            self.ns_user = nn.Linear(user_dim, hidden, bias=False)
            self.ns_cand = nn.Linear(cand_dim, hidden)
            self.ns_out = nn.Linear(hidden, cfg.n_ns_tokens * d)
            if cfg.ns_cross:
                self.ns_user_x = nn.Linear(user_dim, hidden)
                self.ns_cand_x = nn.Linear(cand_dim, hidden)
        else:
            groups = {"cand": cand_dim, "user": self.embeddings.pooled_dim + e + recent_dim}
            if self.n_dense:
                groups["dense"] = self.n_dense
            self.group_names = sorted(groups)
            self.n_ns = len(groups)
            self.ns_groups = nn.ModuleDict({
                g: nn.Sequential(nn.Linear(w, 2 * d), nn.SiLU(), nn.Linear(2 * d, d)) for g, w in groups.items()})
        self.long = None  # long-history NS tokens (memory / search), appended after the others
        if cfg.long_seq.enabled:
            self.long = LongSequenceFeatures(cfg.long_seq, e, d, schema.num_items, schema.num_categories)
            self.n_ns += self.long.n_tokens

    # ------------------------------------------------------------------ S tokens
    def check_batch(self, batch: RequestBatch) -> None:
        """Refuses a batch whose id features were built for other tables (Python ints only: no host sync)."""
        if batch.time_gap_buckets != self.cfg.time_gap_buckets:
            raise ValueError(f"the batch's time gaps were bucketed into {batch.time_gap_buckets} buckets but "
                             f"model.time_gap_buckets={self.cfg.time_gap_buckets}: build the loader / collate "
                             f"with time_gap_buckets={self.cfg.time_gap_buckets}")
        if self.long is not None and batch.long_seq is None:
            raise ValueError("model.long_seq is enabled but the batch has no long history: "
                             "set data.loader.long_max_len > 0 (>= data.loader.max_len)")

    def _recent_events(self, emb: dict[str, JaggedTensor], batch_size: int, sizes: BatchSizes | None = None
                       ) -> torch.Tensor:
        """``[B, K * R * E]``: (item + category) embedding of each kind's R most recent events, one
        slot per recency rank (slot 0 = newest; empty slots are zero)."""
        parts = []
        for k in self.kinds:
            vals = emb[f"{k}.item_id"].values() + emb[f"{k}.category"].values()  # [sum L, E]
            offsets = lengths_to_offsets(emb[f"{k}.item_id"].lengths())
            total = None if sizes is None else kept_total(sizes.seq_lengths[k], self.recent)
            rows, kept = keep_last(offsets, self.recent, total)
            owner = segment_ids(kept[1:] - kept[:-1], rows.shape[0])
            slot = offsets[1:][owner] - 1 - rows  # 0 = most recent
            out = vals.new_zeros(batch_size * self.recent, vals.shape[-1])
            out[owner * self.recent + slot] = vals[rows]
            parts.append(out.view(batch_size, -1))
        return torch.cat(parts, -1)

    def _merge(self, per_kind: list[torch.Tensor], lengths: list[torch.Tensor],
               ts: list[torch.Tensor], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge K jagged token sets into one jagged S sequence per request.

        Returns ``values [sum L_b, D]`` and ``lengths [B]``. Implemented with two stable
        argsorts (secondary key first, then request index), which keeps it jagged.
        ``max_len``: longest history of any kind (Python int; read from ``lengths`` if None).
        """
        batch_size = lengths[0].numel()
        dev = per_kind[0].device
        every_request = torch.arange(batch_size, device=dev)
        req = [torch.repeat_interleave(every_request, ln, output_size=v.shape[0]) for v, ln in zip(per_kind, lengths)]
        if self.cfg.seq_merge == SeqMerge.time_interleaved:
            values = torch.cat([v + self.kind_emb[i] for i, v in enumerate(per_kind)])
            order = torch.argsort(torch.cat(ts), stable=True)  # kind order breaks ties (cat is kind-major)
        else:
            # Each kind's tokens then its SEP token; rank = kind * (max_len + 1) + position.
            if max_len is None:
                max_len = max(int(ln.max()) if ln.numel() else 0 for ln in lengths)
            max_len += 1
            pieces, ranks, owners = [], [], []
            for i, (v, ln) in enumerate(zip(per_kind, lengths)):
                offs = lengths_to_offsets(ln)
                pos = torch.arange(v.shape[0], device=dev) - torch.repeat_interleave(offs[:-1], ln,
                                                                                     output_size=v.shape[0])
                pieces += [v, self.sep[i].expand(batch_size, -1)]
                ranks += [i * (max_len + 1) + pos, torch.full((batch_size,), i * (max_len + 1) + max_len, device=dev)]
                owners += [req[i], every_request]
            values = torch.cat(pieces)
            order = torch.argsort(torch.cat(ranks), stable=True)
            req = owners
            lengths = [ln + 1 for ln in lengths]
        req_all = torch.cat(req)[order]
        order = order[torch.argsort(req_all, stable=True)]
        return values[order], torch.stack(lengths).sum(0)

    def s_tokens(self, emb: dict[str, JaggedTensor], batch: RequestBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """S tokens ``[sum L_b, D]`` and their ``lengths [B]`` from the sequence lookups."""
        sizes = batch.sizes
        ts = batch.seq_ts.values().split([sizes.total(k) for k in self.kinds])  # per kind [sum L_bk]
        per_kind, lengths = [], []
        for k in self.kinds:
            feats = torch.cat([emb[f"{k}.{f}"].values() for f in SEQ_FIELDS], -1)
            per_kind.append(self.seq_proj[k](feats))  # [sum L_bk, D]
            lengths.append(emb[f"{k}.item_id"].lengths().to(torch.int64))
        return self._merge(per_kind, lengths, list(ts), sizes.max_len())

    # ------------------------------------------------------------------ NS tokens
    def ns_tokens(self, emb: dict[str, JaggedTensor], pooled: torch.Tensor, batch: RequestBatch) -> torch.Tensor:
        """``[sum C_b, N', D]`` NS tokens without the long-history ones (``pooled [B, n_sparse*E]``)."""
        b = batch.num_requests
        cand_lengths = batch.cand_offsets[1:] - batch.cand_offsets[:-1]
        cand_vec = torch.cat([emb["cand.item_id"].values(), emb["cand.category"].values()], -1)  # [sum C, 2E]
        if self.cfg.ns_seen_item:
            cand_vec = torch.cat([cand_vec, self.seen_items(batch).to(cand_vec.dtype)[:, None]], -1)  # [sum C, 2E+1]
        n_cand = cand_vec.shape[0]

        def per_candidate(x: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [sum C, ...]
            return torch.repeat_interleave(x, cand_lengths, dim=0, output_size=n_cand)

        recency = emb["req.recency"].values()  # [B, E]
        if self.recent:
            recency = torch.cat([recency, self._recent_events(emb, b, batch.sizes)], -1)  # [B, E + K*R*E]
        dense = signed_log1p(batch.dense.to(cand_vec.dtype))  # [B, n_dense]
        if self.cfg.ns_tokenizer == NsTokenizer.group_wise:
            inputs = {"cand": cand_vec, "user": torch.cat([pooled, recency], -1), "dense": dense}
            toks = [self.ns_groups[g](inputs[g]) for g in self.group_names]
            return torch.stack([t if g == "cand" else per_candidate(t) for g, t in zip(self.group_names, toks)], 1)
        h = self.ns_cand(cand_vec)  # [sum C, N*D]
        user_in = torch.cat([pooled, dense, recency], -1)  # [B, user_dim]
        h = h + per_candidate(self.ns_user(user_in))  # the user half once per request
        if self.cfg.ns_cross:  # explicit user x candidate crossing (e.g. age bucket x category)
            h = h + self.ns_cand_x(cand_vec) * per_candidate(self.ns_user_x(user_in))
        return self.ns_out(nn.functional.silu(h)).view(-1, self.cfg.n_ns_tokens, self.cfg.d_model)  # [sum C, N, D]

    def seen_items(self, batch: RequestBatch) -> torch.Tensor:
        """``[sum C_b]`` bool: candidate c's item id is among its request's history item ids (every kind).

        One membership test over (request, item) keys, ``request * (num_items + 1) + item``, for all
        candidates at once (``torch.isin`` sorts; no per-request loop, no host sync).
        """
        stride = self.num_items + 1
        keys = [segment_ids(jt.lengths(), jt.values().shape[0]) * stride + jt.values().to(torch.int64)
                for jt in (batch.seq[f"{k}.item_id"] for k in self.kinds)]
        cand_items = batch.cand["item_id"].values().to(torch.int64)
        cand_keys = segment_ids(batch.cand_offsets.diff(), cand_items.shape[0]) * stride + cand_items
        return torch.isin(cand_keys, torch.cat(keys))

    # ------------------------------------------------------------------ long history
    def long_event_features(self, long_seq: KeyedJaggedTensor) -> torch.Tensor:
        """``RequestBatch.long_seq`` -> ``[E, 3E]`` = [item | category | action] embeddings of every event.

        Looked up in the same tables as the S tokens (through ``FeatureEmbeddings.sequence``, so
        every item-embedding mode applies): the events ride on the first kind's feature names,
        every other feature of the collection is passed empty.
        """
        d = long_seq.to_dict()
        k0 = self.kinds[0]
        n_req = d["item_id"].lengths().numel()
        empty_v = d["item_id"].values()[:0]
        empty_l = torch.zeros(n_req, dtype=torch.int32, device=empty_v.device)
        keys, values, lengths = id_feature_keys(self.kinds), [], []
        for key in keys:
            fld = key.split(".", 1)[1]
            used = key.startswith(f"{k0}.") and fld != "time_gap"
            values.append(d[fld].values() if used else empty_v)
            lengths.append(d[fld].lengths() if used else empty_l)
        emb = self.embeddings.sequence(keyed_jagged(keys, values, lengths))
        return torch.cat([emb[f"{k0}.{f}"].values() for f in ("item_id", "category", "action")], -1)

    def long_memory_state(self, batch: RequestBatch) -> MemoryState:
        """``[B]`` VQ memory states of a batch's long histories (what a serving cache keeps per user)."""
        if self.long is None or batch.long_seq is None:
            raise ValueError("long_memory_state needs model.long_seq.memory and a batch with long_seq")
        return self.long.memory_state(batch.long_seq, self.long_event_features(batch.long_seq))

    def long_tokens(self, emb: dict[str, JaggedTensor], batch: RequestBatch, memory: MemoryState | None
                    ) -> torch.Tensor:
        """``[sum C_b, n_long, D]`` long-history NS tokens."""
        cand_vec = torch.cat([emb["cand.item_id"].values(), emb["cand.category"].values()], -1)  # [sum C, 2E]
        # With a precomputed memory state and no search, the long history's events are not read at
        # all: the request costs O(M), whatever the history length.
        need_events = memory is None or bool(self.long.modes)
        feats = self.long_event_features(batch.long_seq) if need_events else None
        n_cand, keys = cand_vec.shape[0], list(batch.cand.keys())
        ids = batch.cand.values()  # key-major: [sum C] per key, sliced by the known count (no host sync)
        item, category = (ids[i * n_cand:(i + 1) * n_cand] for i in (keys.index("item_id"), keys.index("category")))
        return self.long(batch.long_seq, feats, cand_vec, item, category, batch.cand_offsets.to(torch.int64), memory,
                         (batch.sizes.long_lengths, batch.sizes.cand_counts))

    # ------------------------------------------------------------------ forward
    def forward(self, batch: RequestBatch, memory: MemoryState | None = None) -> TokenizedBatch:
        """``memory``: precomputed ``[B]`` long-term memory states (``model.long_seq.memory``), else built here.

        The two table lookups read batch attributes as they are (pipelinable by torchrec); the rest
        is :func:`_tokens`.
        """
        emb = self.embeddings.sequence(batch.id_features)
        pooled = self.embeddings.pooled(batch.sparse, batch.num_requests)  # [B, n_sparse*E]
        return _tokens(self, batch, emb, pooled, memory)


@torch.fx.wrap  # one opaque call for torchrec's pipeline tracer: it only needs the lookups' inputs
def _tokens(tok: UnifiedTokenizer, batch: RequestBatch, emb: dict[str, JaggedTensor], pooled: torch.Tensor,
            memory: MemoryState | None) -> TokenizedBatch:
    """S and NS tokens from the lookups (``UnifiedTokenizer.forward`` after its torchrec calls)."""
    tok.check_batch(batch)
    s_tokens, s_lengths = tok.s_tokens(emb, batch)
    ns = tok.ns_tokens(emb, pooled, batch)
    if tok.long is not None:
        ns = torch.cat([ns, tok.long_tokens(emb, batch, memory)], 1)
    sep = int(tok.cfg.seq_merge == SeqMerge.intent_grouped)
    return TokenizedBatch(s_tokens, lengths_to_offsets(s_lengths), ns, batch.cand_offsets.to(torch.int64),
                          batch.sizes.s_lengths(sep))
