"""torchrec tables behind the tokenizer.

Two torchrec modules, both sized from the `DataSchema`:

* an ``EmbeddingCollection`` (unpooled, one vector per event) for the id fields of
  behaviour events and candidates; the item and category tables are *shared* by
  the sequence features (``click.item_id``, ...) and the candidate features
  (``cand.item_id``), so a candidate and a past event of the same item look alike;
* an ``EmbeddingBagCollection`` (sum-pooled) for the user/context sparse features.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recsys.data.schema import DataSchema

SEQ_ID_FIELDS = ("item_id", "category", "action", "time_gap")
CAND_ID_FIELDS = ("item_id", "category")


class FeatureEmbeddings(nn.Module):
    """Looks up every id feature of a batch.

    ``sequence(kjt)`` takes a KJT with keys ``"<kind>.<field>"`` (fields ``item_id``,
    ``category``, ``action``, ``time_gap``), ``"cand.item_id"``, ``"cand.category"`` and
    ``"req.recency"`` (one per request);
    returns a dict of JaggedTensors with values ``[sum L, E]``.
    ``pooled(kjt)`` takes the user/context sparse KJT and returns ``[B, n_sparse * E]``.
    """

    def __init__(self, schema: DataSchema, emb_dim: int, time_gap_buckets: int) -> None:
        super().__init__()
        kinds = schema.sequences
        sizes = {"item_id": schema.num_items, "category": schema.num_categories,
                 "action": schema.num_actions, "time_gap": time_gap_buckets}
        tables = []
        for fld in SEQ_ID_FIELDS:
            feats = [f"{k}.{fld}" for k in kinds] + ([f"cand.{fld}"] if fld in CAND_ID_FIELDS else [])
            if fld == "time_gap":
                feats.append("req.recency")  # request_ts - newest event, same log2 buckets
            # Table names avoid clashing with nn.Module attributes (a table named `items` breaks torchrec).
            tables.append(EmbeddingConfig(name=f"{fld}_table", num_embeddings=sizes[fld],
                                          embedding_dim=emb_dim, feature_names=feats))
        self.emb_dim = emb_dim
        self.seq_tables = EmbeddingCollection(tables=tables, device=torch.device("cpu"))
        self.sparse_names = [f.name for f in schema.sparse]
        self.sparse_tables = None
        if schema.sparse:
            self.sparse_tables = EmbeddingBagCollection(
                tables=[EmbeddingBagConfig(name=f"{f.name}_table", num_embeddings=f.num_embeddings,
                                           embedding_dim=emb_dim, feature_names=[f.name],
                                           pooling=PoolingType.SUM) for f in schema.sparse],
                device=torch.device("cpu"))

    @property
    def pooled_dim(self) -> int:
        return self.emb_dim * len(self.sparse_names)

    def sequence(self, kjt: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        return self.seq_tables(kjt)

    def pooled(self, kjt: KeyedJaggedTensor, batch_size: int) -> torch.Tensor:
        """``[B, n_sparse * E]`` (``[B, 0]`` when the schema has no sparse features)."""
        if self.sparse_tables is None:
            return torch.zeros(batch_size, 0, device=self.seq_tables.embeddings["item_id_table"].weight.device)
        return self.sparse_tables(kjt).values()
