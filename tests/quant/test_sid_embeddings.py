"""SID item embeddings in FeatureEmbeddings / the ranker, pinned by a slow per-item reference."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.schema import DataSchema
from recsys.embeddings.tables import FeatureEmbeddings, hash_ids
from recsys.model.config import ItemEmbeddingConfig, ModelConfig
from recsys.model.ranker import OneTransRanker

M, K, E = 3, 5, 12


def schema() -> DataSchema:
    return DataSchema(sparse=[], dense=[], sequences=["click"], tasks=["click"], num_items=20, num_categories=4,
                      num_actions=3)


def kjt(item_lists: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    """Every key the tables read; only ``<kind>.item_id`` / ``cand.item_id`` matter here (others are 1s)."""
    keys, values, lengths = [], [], []
    spec = {"click.item_id": item_lists["click"], "click.category": None, "click.action": None,
            "click.time_gap": None, "cand.item_id": item_lists["cand"], "cand.category": None, "req.recency": None}
    shape = {"click": item_lists["click"], "cand": item_lists["cand"]}
    for k, v in spec.items():
        rows = v if v is not None else (shape[k.split(".")[0]] if k.split(".")[0] in shape else [[1]] * 3)
        keys.append(k)
        values += [x if v is not None else 1 for r in rows for x in r]
        lengths += [len(r) for r in rows]
    return KeyedJaggedTensor(keys=keys, values=torch.tensor(values, dtype=torch.int64),
                             lengths=torch.tensor(lengths, dtype=torch.int32))


def random_codes(seed: int = 0) -> torch.Tensor:
    codes = torch.randint(K, (20, M + 1), generator=torch.Generator().manual_seed(seed))
    codes[0] = -1  # the OOV id has no SID
    codes[7] = -1  # an item without a content vector
    return codes


def reference(emb: FeatureEmbeddings, item: int, concat: bool) -> torch.Tensor:
    w = emb.sid_tables.embeddings["sid_table"].weight
    rows = [w[m * (K + 1) + (int(c) if c >= 0 else K)] for m, c in enumerate(emb.item_sid[item].tolist())]
    return torch.cat(rows) if concat else torch.stack(rows).sum(0)


ITEMS = {"click": [[3, 7, 0], [], [19]], "cand": [[7, 2], [5], [19, 1, 3]]}


@pytest.mark.parametrize("combine", ["sum", "concat"])
@pytest.mark.parametrize("mode", ["sid", "both"])
def test_sid_lookup_matches_reference(mode, combine):
    cfg = ItemEmbeddingConfig(mode=mode, sid_columns=M, sid_codebook_size=K, combine=combine)
    torch.manual_seed(0)
    emb = FeatureEmbeddings(schema(), E, 8, cfg)
    emb.set_item_sids(random_codes())
    with torch.no_grad():
        if mode == "both":
            emb.seq_tables.embeddings["item_id_table"].weight.normal_()  # as if trained
    out = emb.sequence(kjt(ITEMS))
    for key, rows in (("click.item_id", ITEMS["click"]), ("cand.item_id", ITEMS["cand"])):
        flat = [i for r in rows for i in r]
        got = out[key].values()
        assert got.shape == (len(flat), E)
        assert out[key].lengths().tolist() == [len(r) for r in rows]
        for n, item in enumerate(flat):
            ref = reference(emb, item, combine == "concat")
            if mode == "both":
                ref = ref + emb.seq_tables.embeddings["item_id_table"].weight[item]
            torch.testing.assert_close(got[n], ref)
    assert "item_id_table" in emb.seq_tables.embeddings if mode == "both" else \
        "item_id_table" not in emb.seq_tables.embeddings


def test_both_mode_id_table_starts_at_zero_so_untrained_items_are_their_sid():
    cfg = ItemEmbeddingConfig(mode="both", sid_columns=M, sid_codebook_size=K)
    emb = FeatureEmbeddings(schema(), E, 8, cfg)
    emb.set_item_sids(random_codes())
    out = emb.sequence(kjt(ITEMS))["cand.item_id"].values()
    torch.testing.assert_close(out, emb.sid_embed(torch.tensor([7, 2, 5, 19, 1, 3])))


def test_hashed_ids_read_the_hashed_rows():
    cfg = ItemEmbeddingConfig(mode="id", hash_buckets=6)
    emb = FeatureEmbeddings(schema(), E, 8, cfg)
    out = emb.sequence(kjt(ITEMS))["cand.item_id"].values()
    ids = torch.tensor([7, 2, 5, 19, 1, 3])
    w = emb.seq_tables.embeddings["item_id_table"].weight
    assert w.shape[0] == 6
    torch.testing.assert_close(out, w[hash_ids(ids, 6)])
    assert len(set(hash_ids(torch.arange(1, 13), 6).tolist())) > 1


def test_default_id_mode_is_unchanged():
    emb = FeatureEmbeddings(schema(), E, 8)
    assert emb.sid_tables is None and emb.item_table_params() == 20 * E
    batch = kjt(ITEMS)
    torch.testing.assert_close(emb.sequence(batch)["cand.item_id"].values(),
                               emb.seq_tables(batch)["cand.item_id"].values())
    with pytest.raises(ValueError, match="id only"):
        emb.set_item_sids(random_codes())


def test_bad_sid_tables_are_refused():
    emb = FeatureEmbeddings(schema(), E, 8, ItemEmbeddingConfig(mode="sid", sid_columns=M, sid_codebook_size=K))
    with pytest.raises(ValueError, match="must be in"):
        emb.set_item_sids(torch.full((20, M), K))
    with pytest.raises(ValueError, match="num_items"):
        emb.set_item_sids(torch.zeros(20, M - 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="sid_columns and sid_codebook_size"):
        FeatureEmbeddings(schema(), E, 8, ItemEmbeddingConfig(mode="sid"))
    with pytest.raises(ValueError, match="divisible"):
        FeatureEmbeddings(schema(), 10, 8, ItemEmbeddingConfig(mode="sid", sid_columns=3, sid_codebook_size=K,
                                                                combine="concat"))


@pytest.mark.parametrize("mode", ["sid", "both"])
def test_ranker_fast_path_equals_reference_with_sid_items(mode, tiny_batch):
    schema_, batch = tiny_batch
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=2, ffn_mult=2, n_ns_tokens=2, emb_dim=8, head_hidden=16,
                      attention_backend="reference",
                      item_embedding=ItemEmbeddingConfig(mode=mode, sid_columns=2, sid_codebook_size=4))
    torch.manual_seed(0)
    model = OneTransRanker(schema_, cfg, 3 * 32).eval()
    codes = torch.randint(4, (schema_.num_items, 2), generator=torch.Generator().manual_seed(1))
    model.tokenizer.embeddings.set_item_sids(codes)
    with torch.no_grad():
        tok = model.tokenizer(batch)
        torch.testing.assert_close(model.rank(tok), model.rank_per_candidate(tok), atol=1e-5, rtol=1e-5)
