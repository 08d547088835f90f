"""torchrec tables behind the tokenizer.

Two torchrec modules, both sized from the `DataSchema`:

* an ``EmbeddingCollection`` (unpooled, one vector per event) for the id fields of
  behaviour events and candidates; the item and category tables are *shared* by
  the sequence features (``click.item_id``, ...) and the candidate features
  (``cand.item_id``), so a candidate and a past event of the same item look alike;
* an ``EmbeddingBagCollection`` (sum-pooled) for the user/context sparse features.

Item embedding modes (``ModelConfig.item_embedding``, default ``id`` = the plain id table):

* ``id``: the item id row (``hash_buckets > 0``: a multiplicative hash of the id mod the buckets);
* ``sid``: no id table; item ``i`` with semantic codes ``(c_1..c_M)`` (buffer ``item_sid [I, M]``,
  -1 = no SID) is ``sum_m T[m*(K+1) + c_m]`` (or the concat of the M rows, each E / M wide) of one
  torchrec table ``sid_table`` with ``M * (K+1)`` rows (row K of each column = "no SID");
* ``both``: the id row plus the SID vector; the id table starts at zero, so an item never
  trained on (a cold item) is embedded by its SID alone.

Either way the output keys stay ``"<kind>.item_id"`` / ``"cand.item_id"`` with width E, so the
tokenizer (S tokens and candidate NS tokens) does not change.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recsys.data.id_features import CAND_ID_FIELDS, RECENCY_KEY, SEQ_ID_FIELDS, keyed_jagged
from recsys.data.schema import DataSchema
from recsys.embeddings.config import ItemEmbeddingConfig, ItemEmbeddingMode, SidCombine

_HASH_MULT = 2654435761  # Knuth's multiplicative hash constant (golden ratio * 2^32)


def hash_ids(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    """``ids [N]`` int64 -> ``((ids * 2654435761) mod 2^32) mod buckets`` (spreads consecutive ids)."""
    return (ids * _HASH_MULT) % (1 << 32) % buckets


def _zeros(w: torch.Tensor) -> torch.Tensor:
    return torch.nn.init.zeros_(w)


class FeatureEmbeddings(nn.Module):
    """Looks up every id feature of a batch.

    ``sequence(kjt)`` takes ``RequestBatch.id_features`` (keys ``"<kind>.<field>"`` for the fields
    ``item_id``, ``category``, ``action``, ``time_gap``, then ``"cand.item_id"``, ``"cand.category"``
    and ``"req.recency"``, see ``recsys.data.id_features``) and returns a dict of JaggedTensors with
    values ``[sum L, E]``. With plain id embeddings the KJT goes to the torchrec collection as it is
    (the call torchrec's ``TrainPipelineSparseDist`` pipelines); hashing / SIDs transform it first.
    ``pooled(kjt)`` takes the user/context sparse KJT and returns ``[B, n_sparse * E]``.
    """

    def __init__(self, schema: DataSchema, emb_dim: int, time_gap_buckets: int,
                 item: ItemEmbeddingConfig | None = None) -> None:
        super().__init__()
        kinds = schema.sequences
        item = item or ItemEmbeddingConfig()
        self.item_mode, self.hash_buckets = item.mode, item.hash_buckets
        sizes = {"item_id": item.hash_buckets or schema.num_items, "category": schema.num_categories,
                 "action": schema.num_actions, "time_gap": time_gap_buckets}
        tables = []
        for fld in SEQ_ID_FIELDS:
            if fld == "item_id" and item.mode == ItemEmbeddingMode.sid:
                continue  # no id table at all: items are their SID codes
            feats = [f"{k}.{fld}" for k in kinds] + ([f"cand.{fld}"] if fld in CAND_ID_FIELDS else [])
            if fld == "time_gap":
                feats.append(RECENCY_KEY)  # request_ts - newest event, same log2 buckets
            # Table names avoid clashing with nn.Module attributes (a table named `items` breaks torchrec).
            init = _zeros if fld == "item_id" and item.mode == ItemEmbeddingMode.both else None
            tables.append(EmbeddingConfig(name=f"{fld}_table", num_embeddings=sizes[fld],
                                          embedding_dim=emb_dim, feature_names=feats, init_fn=init))
        self.emb_dim = emb_dim
        self.seq_tables = EmbeddingCollection(tables=tables, device=torch.device("cpu"))
        self.sid_tables = None
        if item.mode != ItemEmbeddingMode.id:
            m, k = item.sid_columns, item.sid_codebook_size
            if m < 1 or k < 1:
                raise ValueError(f"model.item_embedding.mode={item.mode.value} needs sid_columns and "
                                 f"sid_codebook_size >= 1 (got {m}, {k}); training sets them from sid_path")
            if item.combine == SidCombine.concat and emb_dim % m:
                raise ValueError(f"item_embedding.combine=concat needs emb_dim ({emb_dim}) divisible by "
                                 f"sid_columns ({m})")
            self.sid_concat = item.combine == SidCombine.concat
            self.sid_columns, self.sid_codebook_size = m, k
            self.sid_tables = EmbeddingCollection(tables=[EmbeddingConfig(
                name="sid_table", num_embeddings=m * (k + 1), embedding_dim=emb_dim // m if self.sid_concat else emb_dim,
                feature_names=["item.sid"])], device=torch.device("cpu"))
            self.register_buffer("item_sid", torch.full((schema.num_items, m), -1, dtype=torch.int64))
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

    def set_item_sids(self, codes: torch.Tensor) -> None:
        """Installs the item -> SID table ``codes [I', >= M]`` (its first M columns; -1 = no SID).

        ``I'`` may exceed the schema's item count (new items scored later). Raises on codes out of
        ``[-1, K)`` or too few columns.
        """
        if self.sid_tables is None:
            raise ValueError("set_item_sids: this model embeds items by id only (item_embedding.mode=id)")
        if codes.ndim != 2 or codes.shape[1] < self.sid_columns:
            raise ValueError(f"item SID table must be [num_items, >= {self.sid_columns}], got {tuple(codes.shape)}")
        codes = codes[:, : self.sid_columns].to(torch.int64)
        if codes.numel() and (codes.min() < -1 or codes.max() >= self.sid_codebook_size):
            raise ValueError(f"item SID codes must be in [-1, {self.sid_codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        self.item_sid = codes.to(self.item_sid.device).contiguous()

    def sid_embed(self, items: torch.Tensor) -> torch.Tensor:
        """``items [N]`` -> ``[N, E]``: the sum (or concat) of each column's code embedding."""
        if len(items):  # checked on the device: no host sync in the forward
            torch._assert_async(items.max() < self.item_sid.shape[0],
                                f"an item id has no row in the SID table ({self.item_sid.shape[0]} rows)")
        k = self.sid_codebook_size
        codes = self.item_sid[items]  # [N, M]
        idx = torch.where(codes < 0, k, codes) + torch.arange(self.sid_columns, device=codes.device) * (k + 1)
        kjt = keyed_jagged(["item.sid"], [idx.flatten()],
                           [torch.ones(idx.numel(), dtype=torch.int32, device=idx.device)])
        vals = self.sid_tables(kjt)["item.sid"].values().view(len(items), self.sid_columns, -1)  # [N, M, E or E/M]
        return vals.flatten(1) if self.sid_concat else vals.sum(1)

    def item_table_params(self) -> int:
        """Parameters spent on embedding items (id table + SID table)."""
        n = 0
        if "item_id_table" in self.seq_tables.embeddings:
            n += self.seq_tables.embeddings["item_id_table"].weight.numel()
        if self.sid_tables is not None:
            n += self.sid_tables.embeddings["sid_table"].weight.numel()
        return n

    def sequence(self, kjt: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        if self.item_mode == ItemEmbeddingMode.id and not self.hash_buckets:
            return self.seq_tables(kjt)
        return _transformed_lookup(self, kjt)

    def pooled(self, kjt: KeyedJaggedTensor, batch_size: int) -> torch.Tensor:
        """``[B, n_sparse * E]`` (``[B, 0]`` when the schema has no sparse features)."""
        if self.sparse_tables is None:
            return torch.zeros(batch_size, 0, device=self.seq_tables.embeddings["category_table"].weight.device)
        # By name, not .values(): a sharded EBC (torchrec DMP, table-wise) returns its keys grouped by rank.
        pooled = self.sparse_tables(kjt).to_dict()
        return torch.cat([pooled[n] for n in self.sparse_names], dim=1)


@torch.fx.wrap  # opaque to torchrec's pipeline tracer: the KJT is rebuilt, so this lookup is not pipelined
def _transformed_lookup(emb: FeatureEmbeddings, kjt: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
    """``FeatureEmbeddings.sequence`` with hashed item ids and/or semantic-ID item vectors."""
    feats = kjt.to_dict()
    item_keys = [k for k in kjt.keys() if k.endswith(".item_id")]
    rest = {k: jt for k, jt in feats.items() if k not in item_keys}
    if emb.item_mode != ItemEmbeddingMode.sid:
        for k in item_keys:
            v = feats[k].values()
            rest[k] = JaggedTensor(values=hash_ids(v, emb.hash_buckets) if emb.hash_buckets else v,
                                   lengths=feats[k].lengths())
    out = emb.seq_tables(keyed_jagged(list(rest), [jt.values() for jt in rest.values()],
                                      [jt.lengths() for jt in rest.values()]))
    if emb.item_mode != ItemEmbeddingMode.id:
        sizes = [feats[k].values().numel() for k in item_keys]
        sid = emb.sid_embed(torch.cat([feats[k].values() for k in item_keys])).split(sizes)
        for k, part in zip(item_keys, sid):
            vals = part + out[k].values() if emb.item_mode == ItemEmbeddingMode.both else part
            out[k] = JaggedTensor(values=vals, lengths=feats[k].lengths())
    return out
