"""``model.arch=two_tower`` through the one trainer: per-position vectors == the serving path on each
history prefix, the loss == a direct per-position reference (full and sampled softmax), the loss decreases
under ``Trainer.step``, and one CLI training run writes an artifact that ``load_retriever`` and a
``recsys.score mode=cascade`` run read."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from omegaconf import OmegaConf

from recsys.data import RequestLoader, prepare_dataset
from recsys.dist.config import OptimConfig
from recsys.dist.strategy import SingleProcess
from recsys.errors import InputError
from recsys.model.config import ModelConfig, PyramidConfig, RetrievalTrainConfig, TargetItems
from recsys.reliability.checkpoint import CheckpointManager
from recsys.retrieval.artifact import load_retriever
from recsys.retrieval.encoder import newest_s_state, s_tokens_of
from recsys.retrieval.losses import uniform_negatives
from recsys.retrieval.train_hooks import build_trainable
from recsys.retrieval.two_tower_model import ARTIFACT_DIR, TwoTowerModel
from recsys.train.step import Trainer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "serving"))
sys.path.insert(0, str(HERE.parent / "reliability"))
sys.path.insert(0, str(HERE))
from hostile_helpers import run_cli  # noqa: E402
from job_fixtures import SETTINGS, make_checkpoint, tiny_data_config  # noqa: E402
from test_retrieval_losses import reference_sampled  # noqa: E402  (the sampled-softmax loop reference)

CPU = torch.device("cpu")


def model_cfg(**retrieval) -> ModelConfig:
    return ModelConfig(arch="two_tower", d_model=16, n_heads=2, n_layers=2, ffn_mult=2, n_ns_tokens=2, emb_dim=8,
                       head_hidden=16, pyramid=PyramidConfig(mode="none"), attention_backend="torch",
                       retrieval=RetrievalTrainConfig(out_dim=8, **retrieval))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    dcfg = tiny_data_config(tmp_path_factory.mktemp("tt_data"))
    ds = prepare_dataset(dcfg, progress=False)
    batch = next(iter(RequestLoader(ds.splits["train"], ds.schema, replace(dcfg.loader, batch_size=6))))
    return dcfg, ds, batch


def make_model(ds, dcfg, seed=0, **retrieval) -> TwoTowerModel:
    torch.manual_seed(seed)
    from recsys.baselines.factory import max_s_tokens
    cfg = model_cfg(**retrieval)
    model = build_trainable(ds.schema, cfg, max_s_tokens(ds.schema, cfg, dcfg.loader.max_len))
    assert isinstance(model, TwoTowerModel)
    return model


def merged_items(batch, kinds) -> list[list[int]]:
    """Per request, every history event's item id, oldest first (ties: kind order): a Python loop."""
    seq, ts = batch.seq.to_dict(), batch.seq_ts.to_dict()
    out = []
    for b in range(batch.num_requests):
        events = []
        for k_i, k in enumerate(kinds):
            jt, tt = seq[f"{k}.item_id"], ts[k]
            o = jt.offsets()
            for j in range(int(o[b]), int(o[b + 1])):
                events.append((float(tt.values()[j]), k_i, j - int(o[b]), int(jt.values()[j])))
        out.append([e[3] for e in sorted(events)])
    return out


def reference_positions(model: TwoTowerModel, batch, newest: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(user vector ``[P, O]``, target ``[P]``) the slow way: the serving path (``newest_s_state``) on every
    prefix ``0..t`` of each request's S tokens alone, predicting event ``t + 1`` of the Python merge
    (``newest > 0``: the newest ``newest`` targets of each request only)."""
    ranker = model.encoder.ranker
    tokens, offsets = s_tokens_of(ranker, batch)
    users, targets = [], []
    for b, items in enumerate(merged_items(batch, model.kinds)):
        start = int(offsets[b])
        assert int(offsets[b + 1]) - start == len(items)
        for t in range(max(0, len(items) - 1 - newest) if newest else 0, len(items) - 1):
            state, _ = newest_s_state(ranker, tokens[start:start + t + 1], torch.tensor([0, t + 1]))
            users.append(model.encoder.user_proj(state[0]))
            targets.append(items[t + 1])
    return torch.stack(users), torch.tensor(targets)


@pytest.mark.parametrize("max_positions", [0, 1, 3])
def test_positions_are_causal_and_equal_the_serving_path(data, max_positions):
    """... every position, or each request's newest ``max_positions`` (a request per event: not every
    event of a user's history is retrained in each later request)."""
    dcfg, ds, batch = data
    model = make_model(ds, dcfg, max_positions=max_positions)
    with torch.no_grad():
        user, target = model.position_vectors(batch)
        ref_user, ref_target = reference_positions(model, batch, max_positions)
        newest = model.encoder.user_vectors(batch)
    lengths = [len(items) for items in merged_items(batch, model.kinds)]
    expect = sum(max(n - 1, 0) if not max_positions else min(max(n - 1, 0), max_positions) for n in lengths)
    assert user.shape[0] == expect > batch.num_requests // 2 and torch.equal(target, ref_target)
    assert max_positions == 0 or max(lengths) > max_positions + 1  # the cut really drops positions here
    torch.testing.assert_close(user, ref_user, atol=1e-5, rtol=1e-5)
    # serving's vector of a request is the state after its newest event: the next position of the same graph
    tokens, offsets = s_tokens_of(model.encoder.ranker, batch)
    for b in range(batch.num_requests):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        if hi > lo:
            state, _ = newest_s_state(model.encoder.ranker, tokens[lo:hi], torch.tensor([0, hi - lo]))
            torch.testing.assert_close(newest[b], model.encoder.user_proj(state[0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("full", [True, False])
def test_loss_equals_per_position_reference(data, full):
    dcfg, ds, batch = data
    kw = {"full_softmax_max_items": 10**6} if full else {"full_softmax_max_items": 0, "num_negatives": 7}
    model = make_model(ds, dcfg, temperature=0.5, **kw)
    torch.manual_seed(5)
    loss, per_task, graph = model.training_loss(batch)
    assert per_task.numel() == 0 and graph.requires_grad
    with torch.no_grad():
        user, target = reference_positions(model, batch)
        n = ds.schema.num_items
        vecs = model.encoder.item_vectors(torch.arange(n), model.item_category)
        if full:
            per_row = -torch.log_softmax(user @ vecs[1:].T / 0.5, 1)[torch.arange(target.numel()), target - 1]
        else:
            counts = torch.bincount(target, minlength=n).double()  # the fresh model's counts after this batch
            assert torch.equal(model.target_counts, counts)
            log_q = torch.log(target.numel() * (counts[target] + 1) / (counts.sum() + n)).float()
            torch.manual_seed(5)
            s_ids, s_logq = uniform_negatives(n, 7)
            per_row = reference_sampled(user, target, vecs[target], log_q, s_ids, vecs[s_ids], s_logq, 0.5)
    torch.testing.assert_close(loss.detach(), per_row.mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("full", [True, False])
def test_trainer_steps_lower_the_loss(data, full):
    dcfg, ds, batch = data
    kw = {} if full else {"full_softmax_max_items": 0, "num_negatives": 32}
    model = make_model(ds, dcfg, **kw)
    par = SingleProcess(CPU)
    module, opt = par.wrap(model, OptimConfig(dense_lr=3e-3), lambda s: 1.0)
    trainer = Trainer(module, par, opt)
    losses = []
    for _ in range(12):
        torch.manual_seed(1)  # the same negatives every step: the loss of one fixed objective
        res = trainer.step(batch)
        assert res.skipped is None and math.isfinite(res.loss) and res.per_task == []
        losses.append(res.loss)
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("targets", list(TargetItems))
def test_validation_recall_equals_a_brute_force_count(data, targets):
    """``valid_recall@K``: the share of targets (task-0 positives, or every candidate) in their request's top K
    of ``u . v`` over every item, counted request by request."""
    dcfg, ds, batch = data
    model = make_model(ds, dcfg, recall_k=5, valid_targets=targets)
    model.training_loss(batch)  # the item -> category pairs the index is built with
    got = model.validation_metrics([batch], CPU)
    with torch.no_grad():
        items = torch.arange(1, ds.schema.num_items)
        scores = model.encoder.user_vectors(batch) @ model.encoder.item_vectors(items, model.item_category[items]).T
    hits = total = 0
    ids, off = batch.cand["item_id"].values().tolist(), batch.cand_offsets.tolist()
    for b in range(batch.num_requests):
        top = set(items[scores[b].topk(5).indices].tolist())
        for j in range(off[b], off[b + 1]):
            if targets == TargetItems.candidates or batch.labels[j, 0] > 0.5:
                total, hits = total + 1, hits + (ids[j] in top)
    assert got["valid_recall_targets"] == total > 0 and got["valid_recall@5"] == pytest.approx(hits / total)


def test_refusals(data):
    dcfg, ds, _ = data
    with pytest.raises(InputError, match="pyramid.mode=none"):
        TwoTowerModel(ds.schema, replace(model_cfg(), pyramid=PyramidConfig(mode="linear")), 64)
    with pytest.raises(InputError, match="time_interleaved"):
        TwoTowerModel(ds.schema, replace(model_cfg(), seq_merge="intent_grouped"), 64)
    from recsys.baselines.factory import build_model
    with pytest.raises(InputError, match="mode=cascade"):  # the scorers' factory: a retriever is no scorer
        build_model(ds.schema, model_cfg(), 64)
    with pytest.raises(InputError, match="max_positions must be >= 0"):
        RetrievalTrainConfig(max_positions=-1)


def test_cli_training_writes_an_artifact_that_cascade_serves(data, tmp_path):
    dcfg, ds, _ = data
    run = tmp_path / "run"
    proc = run_cli("recsys.train", "model=two_tower", "data=tiny", f"data.root={dcfg.root}", f"output_dir={run}",
                   "train.max_steps=6", "train.progress=false", "train.tensorboard=false",
                   "model.attention_backend=torch")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    k = report["config"]["model"]["retrieval"]["recall_k"]
    assert 0.0 <= report[f"valid_recall@{k}"] <= 1.0 and report["valid_recall_targets"] > 0
    assert report["steps"] == 6
    meta = json.loads((run / ARTIFACT_DIR / "retriever.json").read_text())
    assert meta["kind"] == "two_tower" and meta["fingerprint"]["dataset_dir"] == str(ds.path.resolve())

    # the artifact holds the trained encoder: its vectors equal the final checkpoint's model
    _, ckpt_state = CheckpointManager(run / "checkpoints").load_latest()
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), ckpt_state["config"]["model"]))
    trained = TwoTowerModel(ds.schema, cfg, int(ckpt_state["max_s_tokens"]))
    trained.load_state_dict(ckpt_state["model"])
    trained.eval()

    class Catalog:
        items = np.arange(1, ds.schema.num_items)
        cats = trained.item_category[1:].numpy()

    loaded = load_retriever(run / ARTIFACT_DIR, ds.schema, Catalog(), dataset_dir=str(ds.path.resolve()))
    batch = next(iter(RequestLoader(ds.splits["valid"], ds.schema, dcfg.loader)))
    with torch.no_grad():
        ids, scores = loaded.retrieve(batch, 5)
        want = trained.encoder.user_vectors(batch) @ trained.encoder.item_vectors(
            torch.as_tensor(Catalog.items), torch.as_tensor(Catalog.cats)).T
    torch.testing.assert_close(scores, want.topk(5, dim=1).values, atol=1e-4, rtol=1e-4)
    assert ids.shape == (batch.num_requests, 5) and bool((ids >= 1).all())

    ranker_ckpt = make_checkpoint(tmp_path / "ranker", dcfg)
    out = tmp_path / "cascade"
    proc = run_cli("recsys.score", f"checkpoint={ranker_ckpt}", f"output_dir={out}", *SETTINGS, "mode=cascade",
                   f"cascade.retrievers=['{run / ARTIFACT_DIR}']", "cascade.retrieve_k=8", "cascade.top_n=5")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    m = summary["metrics"]
    assert 0.0 <= m["recall@8_union"] <= 1.0 and m["targets"] > 0, m
    rows = pl.read_parquet(sorted(out.glob("part-*.parquet")))
    retrieved = rows.filter(pl.col("retrieved_by") != "")
    assert retrieved.height > 0 and retrieved["item_id"].min() >= 1
