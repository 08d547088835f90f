"""SASRec-style baseline: causal self-attention over the merged history, next-item objective.

Each request's events (all kinds, time order, the last ``history_cap`` of each kind) become
tokens ``item + category + kind + position`` (position counted back from the newest event),
followed by one learned *query* token that stands for "the next item"; a request with an
empty history is the query token alone. ``n_layers`` pre-norm causal blocks run over the
jagged sequences through ``kernels.jagged_causal_attention`` (the last layer computes the
query row only). The query's output ``u [B, D]`` is the user state.

* Next-item score ``s(u, i) = u . e_i`` with the input item table ``e`` (weights tied as in
  SASRec): trained by a softmax over the whole catalog with each candidate as the target
  (``auxiliary_loss``, weight ``next_item_weight``), used by :meth:`catalog_scores`.
* Task logits ``[C, T]`` (for AUC / log loss like every model): MLP over ``[u, c, u*c]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection

from kernels.jagged_causal_attention import jagged_causal_attention
from recsys.baselines.common import (
    Baseline,
    candidate_owner,
    history_and_candidate_ids,
    merged_history,
    mlp,
    recall_in_top_k,
)
from recsys.data.batch import RequestBatch
from recsys.data.jagged import lengths_to_offsets, positions_in_sequence
from recsys.data.schema import DataSchema
from recsys.model.config import ModelConfig


class CausalBlock(nn.Module):
    """Pre-norm ``x + Attn(norm x)``, ``+ FFN(norm .)`` over jagged sequences ``[sum L, D]``."""

    def __init__(self, d: int, n_heads: int, ffn_mult: int, backend: str) -> None:
        super().__init__()
        self.h, self.dh, self.backend = n_heads, d // n_heads, backend
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.SiLU(), nn.Linear(ffn_mult * d, d))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, last_only: bool) -> torch.Tensor:
        """``x [sum L, D]``, ``offsets [B+1]`` -> ``[sum L, D]``, or ``[B, D]`` (last rows) if ``last_only``."""
        qkv = self.qkv(self.norm1(x)).view(-1, 3, self.h, self.dh)  # [sum L, 3, H, Dh]
        q, k, v = qkv.unbind(1)
        q_offsets = None
        if last_only:
            rows = offsets[1:] - 1
            q, x = q[rows], x[rows]
            q_offsets = torch.arange(offsets.numel(), device=offsets.device)
        a = jagged_causal_attention(q.contiguous(), k.contiguous(), v.contiguous(), offsets, q_offsets,
                                    backend=self.backend)  # [rows, H, Dh]
        x = x + self.out(a.flatten(1))
        return x + self.ffn(self.norm2(x))


class SASRecModel(Baseline):
    def __init__(self, schema: DataSchema, cfg: ModelConfig, max_events: int) -> None:
        """``max_events``: longest merged history the loader can give (sizes the position table)."""
        super().__init__()
        self.tasks, self.kinds, self.cap = list(schema.tasks), list(schema.sequences), cfg.history_cap
        d = cfg.d_model
        self.ids = EmbeddingCollection(tables=[EmbeddingConfig(
            name=f"{fld}_table", num_embeddings=schema.table_size(fld), embedding_dim=d,
            feature_names=[f"hist.{fld}", f"cand.{fld}"]) for fld in ("item_id", "category")],
            device=torch.device("cpu"))
        self.max_pos = max(1, (self.cap * len(self.kinds)) if self.cap else max_events)
        self.pos = nn.Embedding(self.max_pos, d)
        self.kind_emb = nn.Parameter(torch.zeros(len(self.kinds), d))
        self.query = nn.Parameter(torch.randn(d) * 0.02)
        backend = cfg.attention_backend.value
        self.blocks = nn.ModuleList(CausalBlock(d, cfg.n_heads, cfg.ffn_mult, backend) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.head = mlp([3 * d, cfg.head_hidden, len(self.tasks)])
        self.next_item_weight = cfg.next_item_weight
        self.recall_k, self.valid_targets = cfg.retrieval.recall_k, cfg.retrieval.valid_targets
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def sparse_parameters(self) -> list[nn.Parameter]:
        return list(self.ids.parameters())

    @property
    def item_table(self) -> torch.Tensor:
        """``[num_items, D]`` input item embeddings (also the next-item output weights)."""
        return self.ids.embeddings["item_id_table"].weight

    def _embed(self, batch: RequestBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(user states ``u [B, D]``, candidate vectors ``[C, D]``)."""
        b, dev = batch.num_requests, batch.cand_offsets.device
        hist = merged_history(batch, self.kinds, self.cap)
        h_len = hist.offsets[1:] - hist.offsets[:-1]
        emb = self.ids(history_and_candidate_ids(hist, batch))
        back = (h_len[torch.repeat_interleave(torch.arange(b, device=dev), h_len)] - 1
                - positions_in_sequence(hist.offsets)).clamp(max=self.max_pos - 1)  # 0 = newest event
        ev = (emb["hist.item_id"].values() + emb["hist.category"].values() + self.kind_emb[hist.kind]
              + self.pos(back))  # [N, D]
        # [events of request 0, query, events of request 1, query, ...]
        offsets = lengths_to_offsets(h_len + 1)  # [B+1]
        x = ev.new_empty(int(offsets[-1]), ev.shape[-1])
        owner = torch.repeat_interleave(torch.arange(b, device=dev), h_len)
        x[torch.arange(ev.shape[0], device=dev) + owner] = ev
        x[offsets[1:] - 1] = self.query
        for i, block in enumerate(self.blocks):
            x = block(x, offsets, last_only=i == len(self.blocks) - 1)
        u = self.norm(x)  # [B, D]
        c = emb["cand.item_id"].values() + emb["cand.category"].values()  # [C, D]
        return u, c

    def forward(self, batch: RequestBatch) -> torch.Tensor:
        """``batch`` -> logits ``[sum C_b, T]``; in training mode also keeps the next-item loss inputs."""
        u, c = self._embed(batch)
        uc = u[candidate_owner(batch)]  # [C, D]
        if self.training and self.next_item_weight > 0:
            self._pending = (uc, batch.cand["item_id"].values().to(torch.int64))
        return self.head(torch.cat([uc, c, uc * c], -1))

    def auxiliary_loss(self) -> torch.Tensor | None:
        """Weighted full-catalog softmax loss of the last training forward's candidates (None if none)."""
        if self._pending is None:
            return None
        uc, target = self._pending
        self._pending = None
        logits = uc @ self.item_table.T  # [C, M]
        logits[:, 0] = float("-inf")  # the reserved unknown id is never a next item
        return self.next_item_weight * F.cross_entropy(logits.float(), target)

    @torch.no_grad()
    def validation_metrics(self, batches: Iterable[RequestBatch], device: torch.device, max_batches: int = 0,
                           prefix: str = "valid_") -> dict[str, Any]:
        """``{prefix}recall@K`` (``model.retrieval.recall_k``): share of positive candidates (task 0; every
        candidate with ``model.retrieval.valid_targets=candidates``) in their
        request's exact top K of every item ``1..M-1`` by the next-item score (history allowed), the two-tower
        retriever's validation figure."""
        items = torch.arange(1, self.item_table.shape[0], device=device)
        k = min(self.recall_k, items.numel())
        found, total = recall_in_top_k(self, batches, device, max_batches,
                                       lambda b: items[self.catalog_scores(b, items).topk(k, dim=1).indices],
                                       self.valid_targets)
        return {f"{prefix}recall@{self.recall_k}": found / total if total else math.nan,
                f"{prefix}recall_targets": total, f"{prefix}recall_catalog": int(items.numel())}

    @torch.no_grad()
    def catalog_scores(self, batch: RequestBatch, items: torch.Tensor) -> torch.Tensor:
        """Next-item scores ``[B, M]`` of ``items [M]`` for every request (candidates ignored)."""
        u, _ = self._embed(batch)
        return u @ self.item_table[items].T
