"""``model.arch=sid_decoder`` through the one trainer: the loss, the candidate scores and the validation
recall == per-request references (each request's prefix encoded alone, one target at a time), the loss
decreases under ``Trainer.step``, refusals, and one CLI run (``recsys.quant`` -> ``recsys.train``) writes a
``sid`` artifact that ``load_retriever`` and ``recsys.score mode=cascade`` serve."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from recsys.baselines.factory import build_model
from recsys.data import RequestLoader, prepare_dataset
from recsys.dist.config import OptimConfig
from recsys.dist.strategy import SingleProcess
from recsys.errors import InputError
from recsys.model.config import ModelConfig, PyramidConfig, TargetItems
from recsys.model.ranker import PrefixKV
from recsys.quant.artifact import SemanticIds
from recsys.reliability.checkpoint import CheckpointManager
from recsys.retrieval.artifact import load_retriever
from recsys.retrieval.encoder import s_tokens_of
from recsys.retrieval.sid_decoder import sid_nll
from recsys.retrieval.sid_decoder_model import ARTIFACT_DIR, NO_SID_SCORE, SidDecoderModel
from recsys.retrieval.sid_search import sid_beam_search
from recsys.testing import random_request_batch, tiny_schema, torch_threads
from recsys.train.step import Trainer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "serving"))
from cli_runner import run_cli  # noqa: E402
from job_fixtures import SETTINGS, make_checkpoint, tiny_data_config  # noqa: E402

CPU = torch.device("cpu")
SCHEMA = tiny_schema()
NO_SID = (7, 12, 17, 22, 27, 32, 37, 42, 47)
"""Items without a semantic ID in :func:`digit_codes`."""


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def digit_codes(num_items: int, levels: int = 3, base: int = 4) -> torch.Tensor:
    """``[num_items, levels]``: item ``i``'s SID = the base-``base`` digits of ``i - 1`` (unique); row 0 and
    :data:`NO_SID` have none (``-1``)."""
    i = torch.arange(num_items) - 1
    codes = torch.stack([(i // base ** (levels - 1 - lv)) % base for lv in range(levels)], 1)
    codes[0] = -1
    codes[[n for n in NO_SID if n < num_items]] = -1
    return codes


def model_cfg(pyramid: str = "none") -> ModelConfig:
    pyr = PyramidConfig(mode="none") if pyramid == "none" else PyramidConfig(mode="linear", final=0, round_to=1)
    return ModelConfig(arch="sid_decoder", d_model=16, n_heads=2, n_layers=2, ffn_mult=2, n_ns_tokens=2, emb_dim=8,
                       head_hidden=16, pyramid=pyr, attention_backend="torch")


def make_model(schema=SCHEMA, pyramid: str = "none", seed: int = 0, max_s: int = 24) -> SidDecoderModel:
    torch.manual_seed(seed)
    return SidDecoderModel(schema, model_cfg(pyramid), max_s, digit_codes(schema.num_items))


def batch_of(seed: int = 1):
    """Histories of several lengths (two empty), 1..6 candidates, several positives per request."""
    return random_request_batch(SCHEMA, [3, 0, 5, 1, 4, 0, 6], [4, 3, 6, 1, 5, 2, 3], seed=seed)


def prefix_alone(model: SidDecoderModel, batch, b: int) -> PrefixKV:
    """Request ``b``'s user prefix from its own S tokens only."""
    tokens, offsets = s_tokens_of(model.ranker, batch)
    lo, hi = int(offsets[b]), int(offsets[b + 1])
    return model.ranker.encode_prefix(tokens[lo:hi], torch.tensor([0, hi - lo]))


def reference_logprobs(model: SidDecoderModel, batch, rows: list[int]) -> torch.Tensor:
    """``[len(rows)]`` candidate row -> ``log p(its SID)``, each one alone with its request's prefix alone."""
    owner = torch.repeat_interleave(torch.arange(batch.num_requests), batch.cand_offsets.diff())
    items = batch.cand["item_id"].values().long()
    return torch.stack([-sid_nll(model.decoder, prefix_alone(model, batch, int(owner[r])),
                                 model.codes[items[r]].unsqueeze(0)) for r in rows])


@pytest.mark.parametrize("pyramid", ["none", "linear"])
def test_loss_and_scores_equal_per_target_references(pyramid):
    model = make_model(pyramid=pyramid)
    batch = batch_of()
    items = batch.cand["item_id"].values().long()
    has = (model.codes[items] >= 0).all(1)
    positive = batch.labels[:, 0] > 0.5
    targets = (positive & has).nonzero().flatten().tolist()
    assert len(targets) >= 4 and bool((positive & ~has).any()) and bool((~has).any())  # the cases are present
    loss, per_task, graph = model.training_loss(batch)
    assert per_task.numel() == 0 and graph.requires_grad and graph.shape == (len(targets),)
    with torch.no_grad():
        want = -reference_logprobs(model, batch, targets).mean()
        torch.testing.assert_close(loss.detach(), want, atol=1e-5, rtol=1e-5)
        scores = model(batch)
        assert scores.shape == (items.numel(), len(SCHEMA.tasks))
        rows = has.nonzero().flatten().tolist()
        torch.testing.assert_close(scores[rows, 0], reference_logprobs(model, batch, rows), atol=1e-5, rtol=1e-5)
        assert bool((scores[~has] == NO_SID_SCORE).all()) and torch.equal(scores[:, 0], scores[:, 1])


def test_candidates_as_targets_train_on_every_candidate_with_a_sid():
    model = make_model()
    model.sid_targets = TargetItems.candidates
    batch = batch_of()
    has = (model.codes[batch.cand["item_id"].values().long()] >= 0).all(1)
    loss, _, graph = model.training_loss(batch)
    rows = has.nonzero().flatten().tolist()
    assert graph.shape == (len(rows),) and len(rows) < has.numel()
    with torch.no_grad():
        torch.testing.assert_close(loss.detach(), -reference_logprobs(model, batch, rows).mean(), atol=1e-5, rtol=1e-5)


def test_a_batch_without_positives_gives_a_zero_loss_on_the_graph():
    model = make_model()
    batch = batch_of()
    batch = replace(batch, labels=torch.zeros_like(batch.labels))
    loss, _, _ = model.training_loss(batch)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()


@pytest.mark.parametrize("every", [False, True])
def test_validation_recall_equals_a_per_request_beam_search(every):
    """... over the positives, or every candidate (``retrieval.valid_targets=candidates``)."""
    model = make_model().eval()
    model.valid_targets = TargetItems.candidates if every else TargetItems.positives
    batches = [batch_of(seed) for seed in (1, 2)]
    got = model.validation_metrics(batches, CPU)
    trie = model.catalog_trie()
    assert len(trie) == SCHEMA.num_items - 1 - len(NO_SID) == got["valid_recall_catalog"]
    hits = total = 0
    with torch.no_grad():
        for batch in batches:
            items = batch.cand["item_id"].values().long()
            for b in range(batch.num_requests):
                top = sid_beam_search(model.decoder, prefix_alone(model, batch, b), trie, 10).item_ids[0].tolist()
                lo, hi = int(batch.cand_offsets[b]), int(batch.cand_offsets[b + 1])
                for r in range(lo, hi):
                    if every or batch.labels[r, 0] > 0.5:
                        total += 1
                        hits += int(items[r]) in top
    assert got["valid_recall_targets"] == total > 0
    assert not every or total == sum(b.num_candidates for b in batches) > sum(int(b.labels[:, 0].sum()) for b in batches)
    assert got["valid_recall@10"] == pytest.approx(hits / total)
    assert 0.0 <= got["valid_beam_certified"] <= 1.0


def test_trainer_steps_lower_the_loss():
    model = make_model()
    batch = batch_of()
    par = SingleProcess(CPU)
    module, opt = par.wrap(model, OptimConfig(dense_lr=3e-3), lambda s: 1.0)
    trainer = Trainer(module, par, opt)
    losses = [trainer.step(batch).loss for _ in range(12)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0], losses


def test_refusals():
    with pytest.raises(InputError, match="SID table has 60 rows but the data's catalog 50"):
        SidDecoderModel(SCHEMA, model_cfg(), 24, digit_codes(60))
    with pytest.raises(InputError, match="no item of the SID table"):
        SidDecoderModel(SCHEMA, model_cfg(), 24, torch.full((50, 3), -1))
    with pytest.raises(InputError, match="mode=cascade"):  # the scorers' factory: a retriever is no scorer
        build_model(SCHEMA, model_cfg(), 24)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``recsys.quant`` then ``recsys.train model=sid_decoder`` on the tiny data, as a user runs them."""
    root = tmp_path_factory.mktemp("sid_train")
    dcfg = tiny_data_config(root / "data")
    ds = prepare_dataset(dcfg, progress=False)
    quant = run_cli("recsys.quant", "data=tiny", f"data.root={dcfg.root}", f"output_dir={root / 'quant'}")
    assert quant.returncode == 0, quant.stdout[-2000:] + quant.stderr[-3000:]
    run = root / "run"
    proc = run_cli("recsys.train", "model=sid_decoder", "data=tiny", f"data.root={dcfg.root}", f"output_dir={run}",
                   f"model.item_embedding.sid_path={root / 'quant' / 'sids.pt'}", "train.max_steps=6",
                   "train.progress=false", "train.tensorboard=false", "model.attention_backend=torch")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return dcfg, ds, root, run


def test_cli_training_writes_an_artifact_that_serves_the_trained_decoder(trained):
    dcfg, ds, root, run = trained
    report = json.loads((run / "report.json").read_text())
    assert 0.0 <= report["valid_recall@10"] <= 1.0 and report["valid_recall_targets"] > 0 and report["steps"] == 6
    meta = json.loads((run / ARTIFACT_DIR / "retriever.json").read_text())
    assert meta["kind"] == "sid" and meta["fingerprint"]["dataset_dir"] == str(ds.path.resolve())

    _, ckpt_state = CheckpointManager(run / "checkpoints").load_latest()
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), ckpt_state["config"]["model"]))
    sids = SemanticIds.load(root / "quant" / "sids.pt")
    trained_model = SidDecoderModel(ds.schema, cfg, int(ckpt_state["max_s_tokens"]), sids.codes)
    trained_model.load_state_dict(ckpt_state["model"])
    trained_model.eval()

    class Catalog:
        items = np.arange(1, ds.schema.num_items)
        cats = np.zeros(ds.schema.num_items - 1, dtype=np.int64)

    loaded = load_retriever(run / ARTIFACT_DIR, ds.schema, Catalog(), dataset_dir=str(ds.path.resolve()))
    batch = next(iter(RequestLoader(ds.splits["valid"], ds.schema, dcfg.loader)))
    with torch.no_grad():
        ids, scores = loaded.retrieve(batch, 5)
        want = sid_beam_search(trained_model.decoder, trained_model.ranker.encode_prefix(
            *s_tokens_of(trained_model.ranker, batch)), trained_model.catalog_trie(), 5)
    assert torch.equal(ids, want.item_ids) and bool((ids >= 1).all())
    torch.testing.assert_close(scores, want.scores, atol=1e-5, rtol=1e-5)


def test_cascade_serves_the_trained_sid_retriever(trained, tmp_path):
    dcfg, _, _, run = trained
    ckpt = make_checkpoint(tmp_path / "ranker", dcfg)
    out = tmp_path / "score"
    proc = run_cli("recsys.score", "mode=cascade", f"checkpoint={ckpt}", f"output_dir={out}",
                   f"cascade.retrievers=[{run / ARTIFACT_DIR}]", "cascade.retrieve_k=12", *SETTINGS)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert 0.0 <= metrics["recall@12_sid"] <= 1.0 and 0.0 <= metrics["hr@10"] <= 1.0


def test_cli_without_sids_is_a_clear_error(tmp_path):
    dcfg = tiny_data_config(tmp_path / "data")
    proc = run_cli("recsys.train", "model=sid_decoder", "data=tiny", f"data.root={dcfg.root}",
                   f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.progress=false")
    assert proc.returncode != 0
    assert "model.arch=sid_decoder needs model.item_embedding.sid_path" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
