"""DIN-style baseline: target attention of each candidate over its request's history.

Event vector ``h = [item ; category] + kind`` (``[N, 2E]``, the last ``history_cap`` events of
each kind), candidate vector ``c = [item ; category]`` (``[C, 2E]``); item and category tables
are shared by history and candidates (one torchrec ``EmbeddingCollection``, as in the ranker).
For every (candidate, event of its request) pair the activation unit ``MLP([h, c, h*c, h-c])``
gives a score; scores are softmax-normalised per candidate (DIN leaves them unnormalised; the
softmax keeps very long histories on the same scale) and the weighted sum of ``h`` is the
candidate's interest vector. Top MLP over ``[interest, c, interest*c, user sparse, log1p len]``.
Cost: one activation-unit row per pair, ``sum_b C_b * L_b``: cap the history for long-tail data.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from recsys.baselines.common import (
    Baseline,
    candidate_owner,
    history_and_candidate_ids,
    merged_history,
    mlp,
    segment_softmax,
)
from recsys.data.batch import RequestBatch
from recsys.data.schema import DataSchema
from recsys.model.config import ModelConfig


class DINModel(Baseline):
    def __init__(self, schema: DataSchema, cfg: ModelConfig) -> None:
        super().__init__()
        self.tasks, self.kinds, self.cap = list(schema.tasks), list(schema.sequences), cfg.history_cap
        e = cfg.emb_dim
        self.ids = EmbeddingCollection(tables=[EmbeddingConfig(
            name=f"{fld}_table", num_embeddings=schema.table_size(fld), embedding_dim=e,
            feature_names=[f"hist.{fld}", f"cand.{fld}"]) for fld in ("item_id", "category")],
            device=torch.device("cpu"))
        self.sparse_names = [f.name for f in schema.sparse]
        self.user_bags = None
        if schema.sparse:
            self.user_bags = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
                name=f"{f.name}_table", num_embeddings=f.num_embeddings, embedding_dim=e, feature_names=[f.name],
                pooling=PoolingType.SUM) for f in schema.sparse], device=torch.device("cpu"))
        self.kind_emb = nn.Parameter(torch.zeros(len(self.kinds), 2 * e))
        self.unit = mlp([8 * e, cfg.d_model, 1])  # activation unit over [h, c, h*c, h-c]
        user_dim = e * len(schema.sparse) + 1
        self.top = mlp([6 * e + user_dim, cfg.head_hidden, cfg.head_hidden // 2, len(self.tasks)])

    def sparse_parameters(self) -> list[nn.Parameter]:
        return list(self.ids.parameters()) + (list(self.user_bags.parameters()) if self.user_bags else [])

    def forward(self, batch: RequestBatch) -> torch.Tensor:
        """``batch`` -> logits ``[sum C_b, T]``."""
        b, dev = batch.num_requests, batch.cand_offsets.device
        hist = merged_history(batch, self.kinds, self.cap)
        h_len = hist.offsets[1:] - hist.offsets[:-1]
        emb = self.ids(history_and_candidate_ids(hist, batch))
        h = torch.cat([emb["hist.item_id"].values(), emb["hist.category"].values()], -1) + self.kind_emb[hist.kind]
        c = torch.cat([emb["cand.item_id"].values(), emb["cand.category"].values()], -1)  # [C, 2E]
        owner = candidate_owner(batch)  # [C]
        # pairs (candidate i, event j of its request): P = sum_i L_owner(i)
        pair_cand = torch.repeat_interleave(torch.arange(batch.num_candidates, device=dev), h_len[owner])
        first = torch.repeat_interleave(hist.offsets[:-1][owner] - torch.cumsum(h_len[owner], 0) + h_len[owner],
                                        h_len[owner])
        pair_event = torch.arange(pair_cand.numel(), device=dev) + first  # [P] row of the event in h
        hp, cp = h[pair_event], c[pair_cand]  # [P, 2E]
        score = self.unit(torch.cat([hp, cp, hp * cp, hp - cp], -1)).squeeze(-1)  # [P]
        w = segment_softmax(score, pair_cand, batch.num_candidates)
        interest = torch.zeros_like(c).index_add(0, pair_cand, w[:, None] * hp)  # [C, 2E]; empty history -> 0
        if self.user_bags is not None:
            user = self.user_bags(batch.sparse).values()  # [B, n_sparse * E]
        else:
            user = c.new_zeros(b, 0)
        user = torch.cat([user, torch.log1p(h_len.float())[:, None]], -1)[owner]
        return self.top(torch.cat([interest, c, interest * c, user], -1))  # [C, T]
