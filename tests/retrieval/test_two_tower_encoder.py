"""Two-tower encoder on the ranker: user vectors ignore the candidates, equal the ranker's own S stack
(per-candidate reference), item vectors are the ranker's table rows; gradients reach both towers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.model.config import ModelConfig, PyramidConfig
from recsys.model.ranker import OneTransRanker
from recsys.retrieval.encoder import TwoTowerEncoder, item_embeddings, newest_s_state, s_tokens_of
from recsys.retrieval.losses import RetrievalLossConfig, retrieval_loss
from recsys.testing import random_request_batch, tiny_schema

SCHEMA = tiny_schema()
PYRAMIDS = {"none": PyramidConfig(mode="none"), "linear_final3": PyramidConfig(mode="linear", final=3, round_to=1),
            "linear_final0": PyramidConfig(mode="linear", final=0, round_to=4)}


def make_encoder(pyramid: str, n_layers: int = 3) -> TwoTowerEncoder:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=n_layers, ffn_mult=2, n_ns_tokens=3, emb_dim=8,
                      head_hidden=16, pyramid=PYRAMIDS[pyramid], attention_backend="torch")
    return TwoTowerEncoder(OneTransRanker(SCHEMA, cfg, max_s_tokens=24), out_dim=12)


HIST = [(3, 2), (0, 0), (5, 7), (1, 0)]


@pytest.mark.parametrize("pyramid", sorted(PYRAMIDS))
def test_user_vectors_do_not_depend_on_candidates(pyramid):
    enc = make_encoder(pyramid)
    # Same seed: same histories/features; the candidates are drawn last, so they differ in count and ids.
    a = random_request_batch(SCHEMA, HIST, [2, 1, 4, 1], seed=1)
    b = random_request_batch(SCHEMA, HIST, [7, 3, 1, 9], seed=1)
    cand = a.cand.to_dict()
    other = KeyedJaggedTensor(keys=["item_id", "category"], values=torch.cat([
        cand["item_id"].values() % (SCHEMA.num_items - 1) + 1, cand["category"].values().flip(0)]),
        lengths=torch.cat([cand["item_id"].lengths(), cand["category"].lengths()]))
    c = dataclasses.replace(a, cand=other)  # same requests, other candidate items
    assert not torch.equal(a.cand.values(), c.cand.values())
    with torch.no_grad():
        ua, ub, uc = enc.user_vectors(a), enc.user_vectors(b), enc.user_vectors(c)
        assert not torch.allclose(enc.ranker(a), enc.ranker(c))  # the candidates do matter to the ranker
    assert ua.shape == (4, 12)
    torch.testing.assert_close(ua, ub, rtol=0, atol=0)
    torch.testing.assert_close(ua, uc, rtol=0, atol=0)
    torch.testing.assert_close(ua[1], enc.user_proj(enc.empty_history).detach())  # empty history
    assert not torch.allclose(ua[0], ua[2])


@pytest.mark.parametrize("pyramid", ["none", "linear_final3"])
def test_user_state_equals_ranker_per_candidate_reference(pyramid):
    """Where the ranker itself keeps S queries up to the top layer, its slow per-candidate path computes
    the newest S token's top output too: the encoder must equal it."""
    enc = make_encoder(pyramid)
    batch = random_request_batch(SCHEMA, HIST, [1, 1, 1, 1], seed=2)
    with torch.no_grad():
        tok = enc.ranker.tokenizer(batch)
        state, has = newest_s_state(enc.ranker, tok.s_tokens, tok.s_offsets)
        s_out, s_off, _ = enc.ranker.rank_per_candidate(tok, return_tokens=True)
    assert has.tolist() == [True, False, True, True]
    want = s_out[s_off[1:][s_off[1:] > s_off[:-1]] - 1]
    torch.testing.assert_close(state, want, rtol=1e-5, atol=1e-5)


def test_item_vectors_are_the_ranker_rows_and_both_towers_train():
    enc = make_encoder("linear_final0")
    emb = enc.ranker.tokenizer.embeddings
    ids, cats = torch.tensor([1, 5, 2, 5]), torch.tensor([1, 2, 3, 2])
    tables = emb.seq_tables.embeddings
    want = torch.cat([tables["item_id_table"].weight[ids], tables["category_table"].weight[cats]], -1)
    torch.testing.assert_close(item_embeddings(emb, ids, cats), want)

    batch = random_request_batch(SCHEMA, HIST, [1, 1, 1, 1], seed=3)
    users = enc.user_vectors(batch)
    catalog = torch.arange(SCHEMA.num_items)
    items = enc.item_vectors(catalog, catalog % SCHEMA.num_categories)
    targets = torch.tensor([1, 2, 3, 4])
    loss = retrieval_loss(users, targets, torch.zeros(4), items, RetrievalLossConfig(temperature=0.5))
    loss.backward()
    assert tables["item_id_table"].weight.grad is not None
    assert enc.ranker.blocks[0].s_qkv.weight.grad.abs().sum() > 0
    assert enc.ranker.blocks[-1].s_ffn[0].weight.grad is not None  # top block's S path is used here
    s_tokens, _ = s_tokens_of(enc.ranker, batch)
    assert s_tokens.shape[1] == enc.ranker.cfg.d_model
