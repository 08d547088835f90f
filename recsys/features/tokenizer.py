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
  once per request, not once per candidate; or
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
from recsys.features.jagged import keep_last, lengths_to_offsets
from recsys.model.config import ModelConfig


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
    def __init__(self, schema: DataSchema, cfg: ModelConfig) -> None:
        super().__init__()
        self.kinds = list(schema.sequences)
        self.n_dense = len(schema.dense)
        self.cfg = cfg
        d, e = cfg.d_model, cfg.emb_dim
        self.embeddings = FeatureEmbeddings(schema, e, cfg.time_gap_buckets)
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
        else:
            groups = {"cand": cand_dim, "user": self.embeddings.pooled_dim + e + recent_dim}
            if self.n_dense:
                groups["dense"] = self.n_dense
            self.group_names = sorted(groups)
            self.n_ns = len(groups)
            self.ns_groups = nn.ModuleDict({
                g: nn.Sequential(nn.Linear(w, 2 * d), nn.SiLU(), nn.Linear(2 * d, d)) for g, w in groups.items()})

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

    # ------------------------------------------------------------------ forward
    def forward(self, batch: RequestBatch) -> TokenizedBatch:
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
            user = self.ns_user(torch.cat([sparse, dense, recency], -1))  # [B, N*D], once per request
            h = h + torch.repeat_interleave(user, cand_lengths, dim=0)
            ns = self.ns_out(nn.functional.silu(h)).view(-1, self.n_ns, self.cfg.d_model)  # [sum C, N, D]
        else:
            inputs = {"cand": cand_vec, "user": torch.cat([sparse, recency], -1), "dense": dense}
            toks = []
            for g in self.group_names:
                t = self.ns_groups[g](inputs[g])
                toks.append(t if g == "cand" else torch.repeat_interleave(t, cand_lengths, dim=0))
            ns = torch.stack(toks, 1)  # [sum C, N, D]
        return TokenizedBatch(s_tokens, lengths_to_offsets(s_lengths), ns, batch.cand_offsets.to(torch.int64))
