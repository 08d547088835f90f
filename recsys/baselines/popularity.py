"""Popularity baseline: a learned per-item rate, the same for every user.

``logit[c, t] = b_t(item_c) + b_t``: one torchrec ``EmbeddingBagCollection`` table of width ``T``
(one id per candidate row), initialised at zero so every item starts at the global rate, plus a
global bias per task. It ranks every user's candidates by the same per-item score. The count-based
popularity AUC of ``recsys.train``'s report (positives per item in the first epoch) is kept beside it.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.baselines.common import Baseline
from recsys.data.batch import RequestBatch
from recsys.data.schema import DataSchema
from recsys.model.config import ModelConfig


class PopularityModel(Baseline):
    def __init__(self, schema: DataSchema, cfg: ModelConfig) -> None:
        super().__init__()
        self.tasks = list(schema.tasks)
        self.items = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="item_table", num_embeddings=schema.num_items, embedding_dim=len(self.tasks),
            feature_names=["item_id"], pooling=PoolingType.SUM)], device=torch.device("cpu"))
        with torch.no_grad():
            self.items.embedding_bags["item_table"].weight.zero_()
        self.bias = nn.Parameter(torch.zeros(len(self.tasks)))

    def sparse_parameters(self) -> list[nn.Parameter]:
        return list(self.items.parameters())

    def item_logits(self, items: torch.Tensor) -> torch.Tensor:
        """``items [n]`` -> logits ``[n, T]``."""
        kjt = KeyedJaggedTensor(keys=["item_id"], values=items.to(torch.int64), lengths=torch.ones_like(items))
        return self.items(kjt).values() + self.bias  # [n, T]

    def forward(self, batch: RequestBatch) -> torch.Tensor:
        """``batch`` -> logits ``[sum C_b, T]``."""
        return self.item_logits(batch.cand["item_id"].values())
