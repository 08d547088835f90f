"""Baselines: jagged helpers against slow references; every model scores a candidate the same whether it
is batched with other requests/candidates or alone (pins the jagged index arithmetic); optimizer split."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from recsys.baselines.common import merged_history, segment_softmax
from recsys.baselines.factory import build_model, sparse_parameters
from recsys.data.batch import RequestBatch
from recsys.model.config import ModelConfig, TargetItems
from recsys.testing import random_request_batch, tiny_schema

ARCHS = ["popularity", "dlrm", "din", "sasrec"]
# per request: history length per kind (click, like) and candidate count; covers empty, length 1, one / many
SHAPES = [([(0, 0), (1, 0), (7, 3), (0, 5)], [1, 3, 1, 6]), ([(1, 1)], [1]), ([(12, 0), (0, 0)], [9, 2])]


def small_cfg(arch: str, **kw) -> ModelConfig:
    base = dict(arch=arch, d_model=16, n_heads=2, n_layers=2, ffn_mult=2, emb_dim=8, head_hidden=16)
    return ModelConfig(**{**base, **kw})


def request(batch: RequestBatch, b: int, schema) -> RequestBatch:
    """Request ``b`` of ``batch`` as a batch of one (rebuilt through ``random_request_batch``'s layout)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    def sub(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        d = kjt.to_dict()
        return KeyedJaggedTensor.from_jt_dict({k: _slice_jt(v, b) for k, v in d.items()})

    c0, c1 = int(batch.cand_offsets[b]), int(batch.cand_offsets[b + 1])
    return RequestBatch(batch.request_id[b:b + 1], batch.user_id[b:b + 1], batch.request_ts[b:b + 1],
                        sub(batch.sparse), batch.dense[b:b + 1], sub(batch.seq), sub(batch.seq_ts), sub(batch.cand),
                        torch.tensor([0, c1 - c0]), batch.labels[c0:c1])


def _slice_jt(jt, b: int):
    from torchrec.sparse.jagged_tensor import JaggedTensor

    off = jt.offsets()
    return JaggedTensor(values=jt.values()[off[b]:off[b + 1]], lengths=jt.lengths()[b:b + 1])


def only_candidate(batch: RequestBatch, j: int) -> RequestBatch:
    """A one-request batch keeping only candidate ``j`` (of its single request)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    cand = batch.cand.to_dict()
    one = torch.ones(1, dtype=torch.int64)
    return RequestBatch(batch.request_id, batch.user_id, batch.request_ts, batch.sparse, batch.dense, batch.seq,
                        batch.seq_ts,
                        KeyedJaggedTensor(keys=["item_id", "category"],
                                          values=torch.stack([cand["item_id"].values()[j], cand["category"].values()[j]]),
                                          lengths=torch.cat([one, one])),
                        torch.tensor([0, 1]), batch.labels[j:j + 1])


def test_merged_history_matches_a_python_merge():
    schema = tiny_schema()
    for seed, (hist, cands) in enumerate(SHAPES):
        batch = random_request_batch(schema, hist, cands, seed=seed)
        for cap in (0, 1, 4):
            got = merged_history(batch, schema.sequences, cap)
            seq, ts = batch.seq.to_dict(), batch.seq_ts.to_dict()
            for b in range(batch.num_requests):
                events = []
                for k_i, k in enumerate(schema.sequences):
                    off = seq[f"{k}.item_id"].offsets()
                    rows = list(range(int(off[b]), int(off[b + 1])))
                    rows = rows[-cap:] if cap else rows
                    events += [(int(ts[k].values()[r]), k_i, int(seq[f"{k}.item_id"].values()[r]),
                                int(seq[f"{k}.category"].values()[r])) for r in rows]
                events.sort(key=lambda e: (e[0], e[1]))  # time, then kind order (Python's sort is stable)
                lo, hi = int(got.offsets[b]), int(got.offsets[b + 1])
                assert got.item[lo:hi].tolist() == [e[2] for e in events]
                assert got.category[lo:hi].tolist() == [e[3] for e in events]
                assert got.kind[lo:hi].tolist() == [e[1] for e in events]


def test_segment_softmax_matches_per_segment_softmax():
    g = torch.Generator().manual_seed(0)
    seg = torch.tensor([0, 0, 2, 2, 2, 3, 5])  # segments 1 and 4 empty
    scores = torch.randn(seg.numel(), generator=g, dtype=torch.float64) * 30  # large: needs the max shift
    got = segment_softmax(scores, seg, 6)
    for s in seg.unique():
        m = seg == s
        torch.testing.assert_close(got[m], torch.softmax(scores[m], 0))


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_scores_equal_one_request_and_one_candidate_at_a_time(arch):
    schema = tiny_schema()
    torch.manual_seed(0)
    model = build_model(schema, small_cfg(arch, history_cap=4 if arch != "dlrm" else 0), 64).eval()
    for seed, (hist, cands) in enumerate(SHAPES):
        batch = random_request_batch(schema, hist, cands, seed=seed)
        with torch.no_grad():
            full = model(batch)
            assert full.shape == (sum(cands), len(schema.tasks)) and torch.isfinite(full).all()
            for b in range(batch.num_requests):
                one = request(batch, b, schema)
                c0, c1 = int(batch.cand_offsets[b]), int(batch.cand_offsets[b + 1])
                torch.testing.assert_close(model(one), full[c0:c1], rtol=1e-5, atol=1e-5)
                for j in range(c1 - c0):
                    torch.testing.assert_close(model(only_candidate(one, j)), full[c0 + j:c0 + j + 1],
                                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["din", "sasrec"])
def test_history_cap_equals_truncating_the_history(arch):
    """A cap of 2 scores like a batch whose histories were cut to their last 2 events per kind."""
    schema = tiny_schema()
    torch.manual_seed(0)
    model = build_model(schema, small_cfg(arch, history_cap=2), 64).eval()
    batch = random_request_batch(schema, [(5, 1), (0, 3), (2, 2)], [2, 1, 3], seed=3)
    from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

    def cut(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        out = {}
        for k, jt in kjt.to_dict().items():
            off, vals = jt.offsets(), jt.values()
            parts = [vals[max(int(off[b]), int(off[b + 1]) - 2):int(off[b + 1])] for b in range(len(off) - 1)]
            out[k] = JaggedTensor(values=torch.cat(parts), lengths=torch.tensor([len(p) for p in parts]))
        return KeyedJaggedTensor.from_jt_dict(out)

    short = RequestBatch(batch.request_id, batch.user_id, batch.request_ts, batch.sparse, batch.dense,
                         cut(batch.seq), cut(batch.seq_ts), batch.cand, batch.cand_offsets, batch.labels)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(short), rtol=1e-5, atol=1e-5)
        if arch == "din":  # no position table: the same weights without a cap see the longer history
            uncapped = build_model(schema, small_cfg(arch, history_cap=0), 64).eval()
            uncapped.load_state_dict(model.state_dict())
            assert not torch.allclose(uncapped(batch), model(batch))


def test_din_is_invariant_to_the_order_of_history_events():
    """Target attention is a weighted set pooling: permuting events inside a kind changes nothing."""
    schema = tiny_schema(kinds=("click",))
    torch.manual_seed(0)
    model = build_model(schema, small_cfg("din"), 64).eval()
    batch = random_request_batch(schema, [6, 3], [2, 2], seed=1)
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    perm = torch.tensor([2, 0, 5, 1, 4, 3, 8, 6, 7])  # within request 0 (rows 0-5) and request 1 (rows 6-8)
    seq = batch.seq
    shuffled = KeyedJaggedTensor(keys=seq.keys(), lengths=seq.lengths(),
                                 values=torch.cat([v.values()[perm] for v in seq.to_dict().values()]))
    ts = batch.seq_ts  # DIN ignores timestamps except for ordering; keep them aligned with the events
    ts2 = KeyedJaggedTensor(keys=ts.keys(), lengths=ts.lengths(), values=ts.values()[perm])
    other = RequestBatch(batch.request_id, batch.user_id, batch.request_ts, batch.sparse, batch.dense, shuffled, ts2,
                         batch.cand, batch.cand_offsets, batch.labels)
    with torch.no_grad():
        torch.testing.assert_close(model(other), model(batch), rtol=1e-5, atol=1e-5)


def test_sasrec_next_item_loss_and_catalog_scores_match_a_direct_computation():
    schema = tiny_schema()
    torch.manual_seed(0)
    model = build_model(schema, small_cfg("sasrec", next_item_weight=0.5), 64)
    batch = random_request_batch(schema, [(3, 1), (0, 0)], [2, 1], seed=2)
    model.train()
    model(batch)
    loss = model.auxiliary_loss()
    assert model.auxiliary_loss() is None  # consumed
    model.eval()
    items = torch.arange(1, schema.num_items)
    with torch.no_grad():
        u, _ = model._embed(batch)
        scores = model.catalog_scores(batch, items)
    table = model.item_table.detach()
    torch.testing.assert_close(scores, u @ table[1:].T)
    owner = torch.tensor([0, 0, 1])
    full = u[owner] @ table.T
    full[:, 0] = float("-inf")
    ref = 0.5 * torch.nn.functional.cross_entropy(full, batch.cand["item_id"].values())
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k, every", [(1, False), (3, False), (1000, False), (3, True)])
def test_sasrec_validation_recall_counts_positives_ranked_in_the_top_k(k, every):
    """... or every candidate (``model.retrieval.valid_targets=candidates``)."""
    schema = tiny_schema()
    torch.manual_seed(1)
    model = build_model(schema, small_cfg("sasrec"), 64)
    model.recall_k, model.valid_targets = k, TargetItems.candidates if every else TargetItems.positives
    batches = [random_request_batch(schema, [(3, 1), (0, 0), (5, 2)], [2, 1, 3], seed=s) for s in (3, 4)]
    got = model.validation_metrics(batches, torch.device("cpu"))
    hits = total = 0
    with torch.no_grad():  # each positive's rank among items 1..M-1, one at a time
        for batch in batches:
            u, _ = model._embed(batch)
            off = batch.cand_offsets.tolist()
            for b in range(batch.num_requests):
                for j in range(off[b], off[b + 1]):
                    if every or batch.labels[j, 0] > 0.5:
                        item = int(batch.cand["item_id"].values()[j])
                        s = u[b] @ model.item_table[1:].T
                        total += 1
                        hits += int(item >= 1 and int((s > s[item - 1]).sum()) < k)
    assert total > 0 and got["valid_recall_targets"] == total
    assert not every or total == sum(b.num_candidates for b in batches) > sum(int(b.labels[:, 0].sum()) for b in batches)
    assert got[f"valid_recall@{k}"] == pytest.approx(hits / total)
    assert got["valid_recall_catalog"] == schema.num_items - 1


@pytest.mark.parametrize("arch", ARCHS + ["onetrans"])
def test_sparse_parameters_are_exactly_the_torchrec_tables(arch):
    schema = tiny_schema()
    model = build_model(schema, small_cfg(arch), 64)
    tables = {id(p) for m in model.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))
              for p in m.parameters()}
    sparse = {id(p) for p in sparse_parameters(model)}
    assert sparse == tables and sparse
    assert len(sparse) < len(list(model.parameters()))  # something dense is left for the dense optimizer


def test_unknown_arch_fails_at_config_time():
    with pytest.raises(ValueError):
        ModelConfig(arch="transformer")
