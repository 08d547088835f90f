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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import RequestBatch
from recsys.data.schema import DataSchema
from recsys.embeddings.tables import FeatureEmbeddings
from recsys.data.jagged import keep_last, lengths_to_offsets
from recsys.longseq.features import LongSequenceFeatures
from recsys.longseq.memory import MemoryState
from recsys.features.config import TokenizerConfig


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


def time_gap_bucket(gap_s: torch.Tensor, buckets: int) -> torch.Tensor:
    """log2 bucket of a non-negative gap in seconds, in ``1 .. buckets-1`` (0 is reserved)."""
    b = torch.floor(torch.log2(gap_s.clamp_min(0).to(torch.float64) + 1.0)).to(torch.int64) + 1
    return b.clamp_(1, buckets - 1)


def previous_event_gap_bucket(ts: torch.Tensor, lengths: torch.Tensor, buckets: int) -> torch.Tensor:
    """Jagged ``ts [sum L_b]`` (oldest first) -> bucket of ``ts_i - ts_{i-1}``; 0 for each first event."""
    gap = torch.zeros_like(ts)
    gap[1:] = ts[1:] - ts[:-1]
    out = time_gap_bucket(gap, buckets)
    firsts = lengths_to_offsets(lengths)[:-1][lengths > 0]
    out[firsts] = 0
    return out


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
        self.seq_proj = nn.ModuleDict({k: nn.Linear(4 * e, d) for k in self.kinds})
        if cfg.seq_merge == "time_interleaved":
            self.kind_emb = nn.Parameter(torch.randn(len(self.kinds), d) * 0.02)
        else:
            self.sep = nn.Parameter(torch.randn(len(self.kinds), d) * 0.02)
        self.recent = cfg.ns_recent_events
        recent_dim = len(self.kinds) * self.recent * e
        user_dim = self.embeddings.pooled_dim + self.n_dense + e + recent_dim  # + recency + recent events
        cand_dim = 2 * e
        if cfg.ns_tokenizer == "auto_split":
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
    def _id_kjt(self, batch: RequestBatch) -> KeyedJaggedTensor:
        """One KJT with every id feature the EmbeddingCollection reads (seq + time gap + candidate)."""
        keys, values, lengths = [], [], []
        seq = batch.seq.to_dict()
        ts = batch.seq_ts.to_dict()
        for k in self.kinds:
            for fld in ("item_id", "category", "action"):
                jt = seq[f"{k}.{fld}"]
                keys.append(f"{k}.{fld}")
                values.append(jt.values())
                lengths.append(jt.lengths())
            jt = ts[k]
            keys.append(f"{k}.time_gap")
            values.append(previous_event_gap_bucket(jt.values(), jt.lengths(), self.cfg.time_gap_buckets))
            lengths.append(jt.lengths())
        cand = batch.cand.to_dict()
        for fld in ("item_id", "category"):
            keys.append(f"cand.{fld}")
            values.append(cand[fld].values())
            lengths.append(cand[fld].lengths())
        keys.append("req.recency")
        values.append(self._recency_bucket(batch, ts))
        lengths.append(torch.ones_like(batch.request_ts))
        return KeyedJaggedTensor(keys=keys, values=torch.cat(values).to(torch.int64),
                                 lengths=torch.cat(lengths).to(torch.int32))

    def _recency_bucket(self, batch: RequestBatch, ts: dict) -> torch.Tensor:
        """[B] bucket of ``request_ts - newest event`` over all kinds; 0 for an empty history."""
        newest = torch.full_like(batch.request_ts, torch.iinfo(torch.int64).min)
        for k in self.kinds:
            jt = ts[k]
            owner = torch.repeat_interleave(torch.arange(batch.num_requests, device=newest.device), jt.lengths())
            newest = newest.scatter_reduce(0, owner, jt.values(), reduce="amax")
        empty = newest == torch.iinfo(torch.int64).min
        out = time_gap_bucket(batch.request_ts - torch.where(empty, batch.request_ts, newest),
                              self.cfg.time_gap_buckets)
        return torch.where(empty, torch.zeros_like(out), out)

    def _recent_events(self, emb: dict, ts: dict, batch_size: int) -> torch.Tensor:
        """``[B, K * R * E]``: (item + category) embedding of each kind's R most recent events, one
        slot per recency rank (slot 0 = newest; empty slots are zero)."""
        parts = []
        for k in self.kinds:
            vals = emb[f"{k}.item_id"].values() + emb[f"{k}.category"].values()  # [sum L, E]
            offsets = lengths_to_offsets(ts[k].lengths().to(torch.int64))
            rows, kept = keep_last(offsets, self.recent)
            owner = torch.repeat_interleave(torch.arange(batch_size, device=vals.device), kept[1:] - kept[:-1])
            slot = offsets[1:][owner] - 1 - rows  # 0 = most recent
            out = vals.new_zeros(batch_size * self.recent, vals.shape[-1])
            out[owner * self.recent + slot] = vals[rows]
            parts.append(out.view(batch_size, -1))
        return torch.cat(parts, -1)

    def _merge(self, per_kind: list[torch.Tensor], lengths: list[torch.Tensor],
               ts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge K jagged token sets into one jagged S sequence per request.

        Returns ``values [sum L_b, D]`` and ``lengths [B]``. Implemented with two stable
        argsorts (secondary key first, then request index), which keeps it jagged.
        """
        batch_size = lengths[0].numel()
        dev = per_kind[0].device
        req = [torch.repeat_interleave(torch.arange(batch_size, device=dev), ln) for ln in lengths]
        if self.cfg.seq_merge == "time_interleaved":
            values = torch.cat([v + self.kind_emb[i] for i, v in enumerate(per_kind)])
            order = torch.argsort(torch.cat(ts), stable=True)  # kind order breaks ties (cat is kind-major)
        else:
            # Each kind's tokens then its SEP token; rank = kind * (max_len + 1) + position.
            max_len = max(int(ln.max()) if ln.numel() else 0 for ln in lengths) + 1
            every_request = torch.arange(batch_size, device=dev)
            pieces, ranks, owners = [], [], []
            for i, (v, ln) in enumerate(zip(per_kind, lengths)):
                offs = lengths_to_offsets(ln)
                pos = torch.arange(v.shape[0], device=dev) - torch.repeat_interleave(offs[:-1], ln)
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
        keys = [f"{k}.{f}" for k in self.kinds for f in ("item_id", "category", "action", "time_gap")]
        keys += ["cand.item_id", "cand.category", "req.recency"]
        empty_v = d["item_id"].values()[:0]
        empty_l = torch.zeros(n_req, dtype=torch.int32, device=empty_v.device)
        values, lengths = [], []
        for key in keys:
            fld = key.split(".", 1)[1]
            used = key.startswith(f"{k0}.") and fld != "time_gap"
            values.append(d[fld].values() if used else empty_v)
            lengths.append(d[fld].lengths().to(torch.int32) if used else empty_l)
        emb = self.embeddings.sequence(KeyedJaggedTensor(keys=keys, values=torch.cat(values).to(torch.int64),
                                                         lengths=torch.cat(lengths)))
        return torch.cat([emb[f"{k0}.{f}"].values() for f in ("item_id", "category", "action")], -1)

    def long_memory_state(self, batch: RequestBatch) -> MemoryState:
        """``[B]`` VQ memory states of a batch's long histories (what a serving cache keeps per user)."""
        if self.long is None or batch.long_seq is None:
            raise ValueError("long_memory_state needs model.long_seq.memory and a batch with long_seq")
        return self.long.memory_state(batch.long_seq, self.long_event_features(batch.long_seq))

    # ------------------------------------------------------------------ forward
    def forward(self, batch: RequestBatch, memory: MemoryState | None = None) -> TokenizedBatch:
        """``memory``: precomputed ``[B]`` long-term memory states (``model.long_seq.memory``), else built here."""
        emb = self.embeddings.sequence(self._id_kjt(batch))
        per_kind, lengths, ts = [], [], []
        ts_dict = batch.seq_ts.to_dict()
        for k in self.kinds:
            feats = torch.cat([emb[f"{k}.{f}"].values() for f in ("item_id", "category", "action", "time_gap")], -1)
            per_kind.append(self.seq_proj[k](feats))  # [sum L_bk, D]
            lengths.append(ts_dict[k].lengths().to(torch.int64))
            ts.append(ts_dict[k].values())
        s_tokens, s_lengths = self._merge(per_kind, lengths, ts)

        b = batch.num_requests
        cand_lengths = batch.cand_offsets[1:] - batch.cand_offsets[:-1]
        cand_vec = torch.cat([emb["cand.item_id"].values(), emb["cand.category"].values()], -1)  # [sum C, 2E]
        sparse = self.embeddings.pooled(batch.sparse, b)  # [B, n_sparse*E]
        recency = emb["req.recency"].values()  # [B, E]
        if self.recent:
            recency = torch.cat([recency, self._recent_events(emb, ts_dict, b)], -1)  # [B, E + K*R*E]
        dense = signed_log1p(batch.dense.to(cand_vec.dtype))  # [B, n_dense]
        if self.cfg.ns_tokenizer == "auto_split":
            h = self.ns_cand(cand_vec)  # [sum C, N*D]
            user_in = torch.cat([sparse, dense, recency], -1)  # [B, user_dim]
            user = self.ns_user(user_in)  # [B, N*D], once per request
            h = h + torch.repeat_interleave(user, cand_lengths, dim=0)
            if self.cfg.ns_cross:  # explicit user x candidate crossing (e.g. age bucket x category)
                h = h + self.ns_cand_x(cand_vec) * torch.repeat_interleave(self.ns_user_x(user_in), cand_lengths, dim=0)
            ns = self.ns_out(nn.functional.silu(h)).view(-1, self.cfg.n_ns_tokens, self.cfg.d_model)  # [sum C, N, D]
        else:
            inputs = {"cand": cand_vec, "user": torch.cat([sparse, recency], -1), "dense": dense}
            toks = []
            for g in self.group_names:
                t = self.ns_groups[g](inputs[g])
                toks.append(t if g == "cand" else torch.repeat_interleave(t, cand_lengths, dim=0))
            ns = torch.stack(toks, 1)  # [sum C, N, D]
        if self.long is not None:
            if batch.long_seq is None:
                raise ValueError("model.long_seq is enabled but the batch has no long history: "
                                 "set data.loader.long_max_len > 0 (>= data.loader.max_len)")
            cand = batch.cand.to_dict()
            # With a precomputed memory state and no search, the long history's events are not read at
            # all: the request costs O(M), whatever the history length.
            need_events = memory is None or bool(self.long.modes)
            feats = self.long_event_features(batch.long_seq) if need_events else None
            extra = self.long(batch.long_seq, feats, cand_vec,
                              cand["item_id"].values(), cand["category"].values(),
                              batch.cand_offsets.to(torch.int64), memory)  # [sum C, n_long, D]
            ns = torch.cat([ns, extra], 1)
        return TokenizedBatch(s_tokens, lengths_to_offsets(s_lengths), ns, batch.cand_offsets.to(torch.int64))
