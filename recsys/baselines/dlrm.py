"""DLRM-style baseline: pooled-history bags + dense MLP + pairwise dot interaction.

Two torchrec ``EmbeddingBagCollection``s (a collection needs one batch size for all its
features): the *request* bags (stride ``B``) mean-pool each behaviour kind's item and category
ids over its last ``history_cap`` events and look up each user sparse feature; the *candidate*
bags (stride ``C``) look up the candidate's item and category. A bottom MLP maps the dense
inputs (the request's dense features and ``log1p`` history length per kind) to one more
``E``-vector. The ``F`` vectors of a candidate row ``[C, F, E]`` interact by all pairwise dot
products (upper triangle, ``F(F-1)/2``), concatenated with the bottom vector into a top MLP.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.baselines.common import Baseline, candidate_owner, mlp
from recsys.data.batch import RequestBatch
from recsys.data.jagged import keep_last, lengths_to_offsets
from recsys.data.schema import DataSchema
from recsys.features.tokenizer import signed_log1p
from recsys.model.config import ModelConfig


class DLRMModel(Baseline):
    def __init__(self, schema: DataSchema, cfg: ModelConfig) -> None:
        super().__init__()
        self.tasks, self.kinds, self.cap = list(schema.tasks), list(schema.sequences), cfg.history_cap
        e = cfg.emb_dim
        self.sparse_names = [f.name for f in schema.sparse]
        hist = [EmbeddingBagConfig(name=f"hist_{fld}_table", num_embeddings=schema.table_size(fld), embedding_dim=e,
                                   feature_names=[f"{k}.{fld}" for k in self.kinds], pooling=PoolingType.MEAN)
                for fld in ("item_id", "category")]
        users = [EmbeddingBagConfig(name=f"{f.name}_table", num_embeddings=f.num_embeddings, embedding_dim=e,
                                    feature_names=[f.name], pooling=PoolingType.SUM) for f in schema.sparse]
        self.request_bags = EmbeddingBagCollection(tables=hist + users, device=torch.device("cpu"))
        self.cand_bags = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name=f"cand_{fld}_table", num_embeddings=schema.table_size(fld), embedding_dim=e,
            feature_names=[f"cand.{fld}"], pooling=PoolingType.SUM) for fld in ("item_id", "category")],
            device=torch.device("cpu"))
        n_dense = len(schema.dense) + len(self.kinds)
        self.bottom = mlp([n_dense, cfg.head_hidden, e])
        n_vec = 1 + 2 * len(self.kinds) + len(schema.sparse) + 2
        self.n_vec = n_vec
        self.top = mlp([e + n_vec * (n_vec - 1) // 2, cfg.head_hidden, cfg.head_hidden // 2, len(self.tasks)])
        iu = torch.triu_indices(n_vec, n_vec, offset=1)
        self.register_buffer("iu", iu, persistent=False)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return list(self.request_bags.parameters()) + list(self.cand_bags.parameters())

    def _request_kjt(self, batch: RequestBatch) -> tuple[KeyedJaggedTensor, torch.Tensor]:
        """(KJT of the request bags, ``[B, K]`` kept history length per kind)."""
        seq = batch.seq.to_dict()
        keys, values, lengths, hist_len = [], [], [], []
        for fld in ("item_id", "category"):
            for k in self.kinds:
                jt = seq[f"{k}.{fld}"]
                offsets = lengths_to_offsets(jt.lengths().to(torch.int64))
                if self.cap:
                    rows, offsets = keep_last(offsets, self.cap)
                    vals = jt.values()[rows]
                else:
                    vals = jt.values()
                keys.append(f"{k}.{fld}")
                values.append(vals.to(torch.int64))
                lengths.append(offsets[1:] - offsets[:-1])
                if fld == "item_id":
                    hist_len.append(lengths[-1])
        sparse = batch.sparse.to_dict()
        for name in self.sparse_names:
            keys.append(name)
            values.append(sparse[name].values().to(torch.int64))
            lengths.append(sparse[name].lengths().to(torch.int64))
        kjt = KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
        return kjt, torch.stack(hist_len, 1)

    def forward(self, batch: RequestBatch) -> torch.Tensor:
        """``batch`` -> logits ``[sum C_b, T]``."""
        b, e = batch.num_requests, self.bottom[-1].out_features
        kjt, hist_len = self._request_kjt(batch)
        req = self.request_bags(kjt).values().view(b, -1, e)  # [B, 2K + n_sparse, E]
        dense = torch.cat([signed_log1p(batch.dense.float()), torch.log1p(hist_len.float())], -1)  # [B, n_dense]
        bottom = self.bottom(dense)  # [B, E]
        owner = candidate_owner(batch)
        cand = batch.cand.to_dict()
        ckjt = KeyedJaggedTensor(keys=["cand.item_id", "cand.category"],
                                 values=torch.cat([cand["item_id"].values(), cand["category"].values()]).to(torch.int64),
                                 lengths=torch.ones(2 * batch.num_candidates, dtype=torch.int64, device=owner.device))
        cvec = self.cand_bags(ckjt).values().view(-1, 2, e)  # [C, 2, E]
        z = torch.cat([torch.cat([bottom[:, None], req], 1)[owner], cvec], 1)  # [C, F, E]
        dots = torch.bmm(z, z.transpose(1, 2))[:, self.iu[0], self.iu[1]]  # [C, F(F-1)/2]
        return self.top(torch.cat([bottom[owner], dots], -1))  # [C, T]
