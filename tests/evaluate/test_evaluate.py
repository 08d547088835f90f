"""``recsys.evaluate``: the report folder's plots exist with real content, the plotted ROC points give
back metrics.json's AUC, slice metrics and catalog ranks agree with slow references."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recsys.baselines.factory import build_model
from recsys.evaluate.buckets import bucket_metrics, calibration_table, quantile_buckets
from recsys.evaluate.catalog import catalog_ranks
from recsys.evaluate.config import EvaluateConfig
from recsys.evaluate.config import register_configs as register_eval
from recsys.evaluate.plots import roc_figure, training_figure
from recsys.evaluate.run import roc_points, run_evaluation
from recsys.model.config import ModelConfig
from recsys.model.metrics import auc
from recsys.serving.catalog import ranking_scores, with_candidates
from recsys.serving.config import CatalogTarget
from recsys.serving.ranking import Catalog
from recsys.testing import random_request_batch, tiny_schema, torch_threads
from recsys.train.config import register_configs
from recsys.train.loop import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
register_configs()
register_eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small-batch training on a shared 2-core CI box: one intra-op thread avoids oversubscription
    (several x faster there); restored afterwards."""
    with torch_threads(1):
        yield


PNGS = ["roc.png", "calibration.png", "auc_by_history_length.png", "auc_by_item_popularity.png",
        "auc_cold_warm.png", "training_curves.png"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A short DLRM run on the tiny data (with validation in the log) and its evaluation folder."""
    tmp = tmp_path_factory.mktemp("eval")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["data=tiny", "model=dlrm", f"data.root={tmp / 'data'}",
                                          f"output_dir={tmp / 'run'}", "train.progress=false", "train.epochs=2",
                                          "train.log_every=2", "train.eval_every=4"])
        ecfg = compose("evaluate", overrides=[f"checkpoint={tmp / 'run'}", f"output_dir={tmp / 'run' / 'eval'}",
                                              "progress=false", "catalog.max_requests=20"])
    train(OmegaConf.to_object(cfg))
    return run_evaluation(OmegaConf.to_object(ecfg)).parent


def test_every_plot_is_a_non_blank_png(report):
    metrics = json.loads((report / "metrics.json").read_text())
    assert sorted(metrics["plots"].values()) == sorted(PNGS)
    for name in PNGS:
        img = mpimg.imread(report / name)  # [H, W, 4] floats
        assert img.shape[0] > 100 and img.shape[1] > 100, name
        assert img[..., :3].std() > 0.05, name  # not a blank canvas
        assert len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 20, name  # lines, bars, text


def test_roc_auc_recomputed_from_the_plotted_points_matches_metrics_json(report):
    metrics = json.loads((report / "metrics.json").read_text())
    roc = json.loads((report / "curves.json").read_text())["roc"]
    fpr, tpr = np.array(roc["fpr"]), np.array(roc["tpr"])
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1 and (np.diff(fpr) >= 0).all()
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics["auc"], abs=1e-6)


def test_roc_figure_draws_exactly_the_given_points():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = labels * 0.7 + rng.normal(size=300)
    scores[:50] = np.round(scores[:50])  # ties
    fpr, tpr = roc_points(scores, labels)
    fig = roc_figure(fpr, tpr, auc(scores, labels), "t")
    xy = fig.axes[0].get_lines()[0].get_xydata()
    np.testing.assert_allclose(xy[:, 0], fpr)
    np.testing.assert_allclose(xy[:, 1], tpr)
    assert np.trapezoid(xy[:, 1], xy[:, 0]) == pytest.approx(auc(scores, labels), abs=1e-6)  # torchmetrics: fp32


def test_report_metrics_are_complete_and_consistent(report):
    m = json.loads((report / "metrics.json").read_text())
    for key in ("auc", "logloss", "ece", "hr@10", "ndcg@10", "score_candidates_per_s", "oracle_auc"):
        assert m[key] is not None and np.isfinite(m[key]), key
    for name in ("by_history_length", "by_item_popularity", "by_cold_warm"):
        assert sum(r["rows"] for r in m[name]) == m["rows"], name
    assert m["catalog_requests"] <= 20 + 15  # whole batches of 16 until >= 20 requests
    assert 0 <= m["ndcg@10"] <= m["hr@10"] <= 1
    log = [json.loads(x) for x in (report.parent / "train_log.jsonl").read_text().splitlines()]
    assert any("valid_auc" in r for r in log)  # the training plot had a validation curve to draw


def test_bucket_metrics_match_metrics_on_each_subset():
    rng = np.random.default_rng(1)
    n = 400
    values = rng.integers(0, 50, n)
    labels = rng.integers(0, 2, n).astype(float)
    scores = labels + rng.normal(size=n) + values / 50
    users = rng.integers(0, 30, n)
    idx, names = quantile_buckets(values, 4)
    rows = bucket_metrics(idx, names, scores, labels, users)
    assert len(rows) == 4 and sum(r["rows"] for r in rows) == n
    for i, r in enumerate(rows):
        m = idx == i
        assert r["auc"] == pytest.approx(auc(scores[m], labels[m]))
        lo, hi = (float(x) for x in r["bucket"].split("-"))
        assert values[m].min() == lo and values[m].max() == hi
    his = [float(r["bucket"].split("-")[1]) for r in rows]  # buckets are ordered and disjoint
    los = [float(r["bucket"].split("-")[0]) for r in rows]
    assert all(h < next_lo for h, next_lo in zip(his, los[1:]))


def test_quantile_buckets_edge_cases():
    idx, names = quantile_buckets(np.full(10, 3), 5)  # one distinct value -> one bucket
    assert names == ["3-3"] and (idx == 0).all()
    idx, names = quantile_buckets(np.zeros(0), 5)
    assert idx.size == 0 and names == []
    rows = bucket_metrics(np.zeros(3, dtype=np.int64), ["a"], np.array([0.1, 0.2, 0.3]), np.ones(3), np.zeros(3))
    assert rows[0]["auc"] is None and rows[0]["gauc"] is None  # one class: undefined, not a number


def test_calibration_table_against_a_loop():
    rng = np.random.default_rng(2)
    p = rng.uniform(size=500)
    y = (rng.uniform(size=500) < p).astype(float)
    rows, ece = calibration_table(p, y, 10)
    assert sum(r["count"] for r in rows) == 500
    ref = 0.0
    for b in range(10):
        m = (p >= b / 10) & (p < (b + 1) / 10)
        ref += m.sum() / 500 * abs(p[m].mean() - y[m].mean())
    assert ece == pytest.approx(ref)


def test_training_figure_without_validation_rows_still_draws_the_loss():
    fig = training_figure([{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}])
    assert fig.axes[0].get_lines()[0].get_xydata().tolist() == [[1, 0.7], [2, 0.6]]


@pytest.mark.parametrize("arch", ["popularity", "din", "sasrec"])
def test_catalog_ranks_match_a_sort_of_brute_force_scores(arch):
    schema = tiny_schema()
    torch.manual_seed(0)
    model = build_model(schema, ModelConfig(arch=arch, d_model=16, n_heads=2, emb_dim=8, head_hidden=16), 64).eval()
    batch = random_request_batch(schema, [(3, 0), (0, 0), (1, 2)], [2, 1, 3], seed=4)
    category = np.arange(schema.num_items) % schema.num_categories
    items = torch.arange(1, schema.num_items)
    catalog = Catalog(items.numpy(), category[1:], schema.num_items)
    ranks, n_req = catalog_ranks(model, [batch], catalog, schema.sequences, CatalogTarget.candidates, False, 7,
                                 torch.device("cpu"))
    cats = torch.as_tensor(category[1:])
    expected = []
    with torch.no_grad():
        if arch == "sasrec":
            scores = model.catalog_scores(batch, items)
        else:  # every item as the only candidate of every request: [B, M]
            scores = model(with_candidates(batch, items, cats))[:, 0].view(batch.num_requests, -1)
    off = batch.cand_offsets.tolist()
    for b in range(batch.num_requests):
        order = sorted(range(len(items)), key=lambda j: (-float(scores[b, j]), j))  # ties by item id
        for t in sorted(set(batch.cand["item_id"].values()[off[b]:off[b + 1]].tolist())):
            expected.append(order.index(t - 1))
    assert n_req == 3 and ranks.tolist() == expected


def test_onetrans_catalog_scores_through_the_serving_path_equal_plain_forward():
    """The ranker uses the KV-cached serving path; the protocol is the same as scoring the catalog
    as ordinary candidates."""
    schema = tiny_schema()
    torch.manual_seed(0)
    model = build_model(schema, ModelConfig(d_model=16, n_heads=2, n_layers=2, emb_dim=8, head_hidden=16,
                                            n_ns_tokens=2, attention_backend="torch"), 64).eval()
    batch = random_request_batch(schema, [(3, 1), (0, 0)], [1, 2], seed=5)
    items = torch.arange(1, schema.num_items)
    cats = items % schema.num_categories
    with torch.no_grad():
        fast = ranking_scores(model, batch, items, cats, 0, chunk=9)
        slow = model(with_candidates(batch, items, cats))[:, 0].view(2, -1)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_evaluate_and_compare_configs_compose_and_reject_typos():
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigKeyError

    from recsys.compare.config import CompareConfig
    from recsys.compare.config import register_configs as register_compare

    register_compare()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        ev = OmegaConf.to_object(compose("evaluate", overrides=["checkpoint=/x", "output_dir=/y"]))
        cmp = OmegaConf.to_object(compose("compare", overrides=["data=ml100k"]))
        with pytest.raises((ConfigCompositionException, ConfigKeyError)):
            compose("evaluate", overrides=["checkpoint=/x", "output_dir=/y", "catalog.topk=3"])
    assert isinstance(ev, EvaluateConfig) and isinstance(cmp, CompareConfig)
    assert cmp.models == ["small", "popularity", "dlrm", "din", "sasrec"] and cmp.data.source.value == "ml100k"
