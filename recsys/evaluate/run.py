"""``run_evaluation``: checkpoint + split -> report folder (metrics.json, curves.json, PNGs).

Files written to ``output_dir``:

* ``metrics.json``: ``metrics_report`` of the split (AUC / GAUC / log loss per task, oracle AUC on
  synthetic data), ECE, per-bucket AUC/GAUC (history length, item popularity, cold vs warm),
  scoring throughput, full-catalog HR@K / NDCG@K, and the protocol of each figure;
* ``curves.json``: the exact points drawn in roc.png and calibration.png;
* ``roc.png``, ``calibration.png``, ``auc_by_history_length.png``, ``auc_by_item_popularity.png``,
  ``auc_cold_warm.png``, ``training_curves.png`` (from the run's ``train_log.jsonl``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torchmetrics.functional.classification import binary_roc

from recsys.baselines import SASRecModel
from recsys.data import PreparedDataset, RequestLoader
from recsys.data.batch import RequestBatch
from recsys.data.config import LoaderConfig
from recsys.data.id_features import TIME_GAP_BUCKETS
from recsys.data.item_categories import collect_item_categories
from recsys.data.prepare import as_data_config
from recsys.data.schema import DataSchema
from recsys.errors import InputError
from recsys.evaluate.buckets import bucket_metrics, calibration_table, item_counts, quantile_buckets
from recsys.evaluate.catalog import catalog_ranks
from recsys.evaluate.config import EvaluateConfig, RelevantItems
from recsys.evaluate.plots import bucket_figure, calibration_figure, roc_figure, save, training_figure
from recsys.model.metrics import hr_ndcg_at_k
from recsys.reliability.device import resolve_device
from recsys.reliability.digest import json_default
from recsys.reliability.rundir import check_output_dir, lock_run_dir
from recsys.serving.catalog import catalog_items
from recsys.serving.config import CatalogTarget
from recsys.serving.inputs import trained_dataset, trained_dataset_inputs
from recsys.serving.load import load_model, resolve_checkpoint
from recsys.train.evaluate import Predictions, metrics_report, predict


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact ROC ``(fpr, tpr)`` (one point per distinct threshold; torchmetrics)."""
    fpr, tpr, _ = binary_roc(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels).to(torch.int64))
    return fpr.numpy(), tpr.numpy()


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "train_log.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def eval_config_dict(cfg: EvaluateConfig) -> dict[str, Any]:
    """The settings that change the report's numbers (not where it is written, not progress bars)."""
    d = json.loads(json.dumps(asdict(cfg)))
    for k in ("output_dir", "progress", "num_threads"):
        d.pop(k, None)
    return d


def run_dir_of(ckpt: Path) -> Path:
    """The training run directory of a checkpoint file (``<run>/checkpoints/step_<N>.pt`` -> ``<run>``)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _time_gap_buckets(run_cfg: dict[str, Any]) -> int:
    """The checkpoint's ``model.time_gap_buckets`` (the loader buckets time gaps the way the model was trained)."""
    return int(run_cfg["model"].get("time_gap_buckets", TIME_GAP_BUCKETS))


def evaluation_inputs(ckpt: Path, run_cfg: dict[str, Any]) -> list[tuple[str, str | Path | None]]:
    """What the report reads, as ``(key, path)``: the checkpoint, its run's train_log.jsonl, its dataset
    (recorded ``dataset_dir``, and raw files). ``output_dir`` must overlap none of them (so ``<run>/eval`` is
    fine, ``<run>`` is not)."""
    return [("checkpoint", ckpt), ("train log", run_dir_of(ckpt) / "train_log.jsonl"),
            *trained_dataset_inputs(run_cfg)]


@dataclass
class OpenedEvaluation:
    """What an evaluation resolved and checked before it touches its output directory."""

    out: Path
    ckpt: Path
    device: torch.device
    model: torch.nn.Module
    schema: DataSchema
    run_cfg: dict[str, Any]
    ds: PreparedDataset
    loader_cfg: LoaderConfig
    batches: list[RequestBatch]
    rank_task: int
    """Index of the task ranking the catalog (``catalog.rank_task``)."""


def run_evaluation(cfg: EvaluateConfig) -> Path:
    """Write the report folder; returns the path of ``metrics.json``.

    Everything is resolved and checked before ``output_dir`` is touched: the checkpoint loads, the output
    directory overlaps no input (``check_output_dir``), the split exists and has rows; the report is then
    written under the directory's lock (``lock_run_dir``: one process per output directory). The dataset
    is the one the checkpoint recorded (``recsys.serving.inputs.trained_dataset``, as ``recsys.score``).
    """
    ckpt = resolve_checkpoint(cfg.checkpoint)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    model, schema, run_cfg = load_model(ckpt, device)
    if run_cfg.get("score_prior") is not None:
        raise InputError(f"{ckpt} is a residual ranker (train.hard_negatives.prior): its logits are trained on top "
                         f"of retriever {run_cfg['score_prior']['retriever']}'s score, which recsys.evaluate does "
                         "not add; measure it with python -m recsys.score mode=cascade")
    tasks = list(schema.tasks)
    task = cfg.catalog.rank_task or tasks[0]
    if task not in tasks:
        raise InputError(f"catalog.rank_task={task!r} is not among the model's tasks {tasks}")
    out = check_output_dir(cfg.output_dir, evaluation_inputs(ckpt, run_cfg))  # before anything is written
    # the split evaluated, and train (item popularity): missing or empty -> InputError naming the dataset
    ds = trained_dataset(run_cfg, need=("train", cfg.split))
    data_cfg = as_data_config(OmegaConf.create(run_cfg["data"]))
    loader_cfg = replace(data_cfg.loader, batch_size=cfg.batch_size, shuffle=False, drop_last=False)
    batches = list(RequestLoader(ds.splits[cfg.split], schema, loader_cfg, time_gap_buckets=_time_gap_buckets(run_cfg)))  # collated once, outside the timing
    opened = OpenedEvaluation(out, ckpt, device, model, schema, run_cfg, ds, loader_cfg, batches, tasks.index(task))
    with lock_run_dir(out):
        return _report(cfg, opened)


def _report(cfg: EvaluateConfig, opened: OpenedEvaluation) -> Path:
    """The report itself (see the module docstring), written into the locked output directory."""
    pred, metrics = score_split(cfg, opened)
    title = f"{metrics['arch']} — {opened.schema.tasks[0]}, {cfg.split} ({pred.labels.shape[0]} rows)"
    plots, curves = curve_figures(cfg, opened.out, pred, metrics, title)
    plots.update(slice_figures(cfg, opened, pred, metrics, title))
    run_dir = run_dir_of(opened.ckpt)
    log = read_log(run_dir)
    if log:
        plots["training"] = save(training_figure(log), opened.out / "training_curves.png").name
    metrics["train_log"] = str(run_dir / "train_log.jsonl") if log else None
    if cfg.catalog.enabled:
        metrics.update(catalog_report(cfg, opened))
        metrics["protocol"]["catalog"] = metrics.pop("catalog_protocol")
    metrics["plots"] = plots
    metrics["eval_config"] = eval_config_dict(cfg)
    (opened.out / "curves.json").write_text(json.dumps(curves, default=json_default))
    path = opened.out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, default=json_default))
    return path


def score_split(cfg: EvaluateConfig, opened: OpenedEvaluation) -> tuple[Predictions, dict[str, Any]]:
    """Predictions of every candidate row of the split and their metrics (``metrics_report``, throughput)."""
    model, batches, device, tasks = opened.model, opened.batches, opened.device, list(opened.schema.tasks)
    predict(model, batches[:1], device)  # warm-up (lazy init, allocator), not timed
    t0 = time.perf_counter()
    pred = predict(model, batches, device)
    score_s = time.perf_counter() - t0
    metrics: dict[str, Any] = metrics_report(pred, tasks, "")
    n_req = sum(b.num_requests for b in batches)
    metrics.update({"arch": opened.run_cfg["model"].get("arch", "onetrans"), "checkpoint": str(opened.ckpt),
                    "split": cfg.split, "requests": n_req, "score_time_s": score_s,
                    "score_requests_per_s": n_req / score_s, "score_candidates_per_s": pred.labels.shape[0] / score_s,
                    "device": device.type, "threads": torch.get_num_threads()})
    metrics["protocol"] = {
        "auc": f"pooled ROC AUC of task {tasks[0]!r} over every candidate row of split {cfg.split!r}",
        "gauc": "row-weighted mean of per-user AUCs over users with both classes (undefined: null)",
        "throughput": "model forward over pre-collated batches of the split (predict), after one warm-up batch",
    }
    return pred, metrics


def curve_figures(cfg: EvaluateConfig, out: Path, pred: Predictions, metrics: dict[str, Any], title: str
                  ) -> tuple[dict[str, str], dict[str, Any]]:
    """roc.png and calibration.png of the first task (and their points, curves.json); sets ``metrics["ece"]``."""
    scores, labels = pred.logits[:, 0], pred.labels[:, 0]
    probs = 1.0 / (1.0 + np.exp(-scores.astype(np.float64)))
    plots: dict[str, str] = {}
    curves: dict[str, Any] = {}
    if 0 < labels.sum() < labels.size:
        fpr, tpr = roc_points(scores, labels)
        curves["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
        plots["roc"] = save(roc_figure(fpr, tpr, metrics["auc"], title), out / "roc.png").name
    cal, ece = calibration_table(probs, labels, cfg.calibration_bins)
    metrics["ece"] = ece
    curves["calibration"] = cal
    plots["calibration"] = save(calibration_figure(cal, ece, title), out / "calibration.png").name
    return plots, curves


SLICE_FILES = {"history_length": "auc_by_history_length.png", "item_popularity": "auc_by_item_popularity.png",
               "cold_warm": "auc_cold_warm.png"}


def slice_figures(cfg: EvaluateConfig, opened: OpenedEvaluation, pred: Predictions, metrics: dict[str, Any],
                  title: str) -> dict[str, str]:
    """AUC / GAUC by history length, item popularity and cold vs warm (``metrics["by_<slice>"]`` and a PNG each)."""
    scores, labels, users = pred.logits[:, 0], pred.labels[:, 0], pred.users
    hb, hl = quantile_buckets(pred.history_len, cfg.n_buckets)
    counts = item_counts(opened.ds.splits["train"], opened.schema.num_items)[pred.items]
    pb, pl_ = quantile_buckets(counts, cfg.n_buckets)
    cold = (counts <= cfg.cold_max_count).astype(np.int64)
    cw_labels = [f"cold (<= {cfg.cold_max_count} train impressions)", "warm"]
    slices = {
        "history_length": (bucket_metrics(hb, hl, scores, labels, users), "history length (events, all kinds)"),
        "item_popularity": (bucket_metrics(pb, pl_, scores, labels, users), "item impressions in the train split"),
        "cold_warm": (bucket_metrics(1 - cold, cw_labels, scores, labels, users), "item"),
    }
    plots = {}
    for name, (rows, xlabel) in slices.items():
        metrics[f"by_{name}"] = rows
        plots[name] = save(bucket_figure(rows, f"{title}: by {name.replace('_', ' ')}", xlabel, metrics["auc"]),
                           opened.out / SLICE_FILES[name]).name
    metrics["protocol"]["buckets"] = (f"{cfg.n_buckets} quantile buckets of the rows' value (merged when edges "
                                      f"coincide); cold = item shown <= {cfg.cold_max_count} times in the train split")
    return plots


def catalog_report(cfg: EvaluateConfig, opened: OpenedEvaluation) -> dict[str, Any]:
    """HR@K / NDCG@K of the full-catalog ranking (``recsys.serving.ranking``) over the first requests of the split."""
    c, schema = cfg.catalog, opened.schema
    cat_loader = replace(opened.loader_cfg, batch_size=c.batch_size)
    batches: list[RequestBatch] = []
    for b in RequestLoader(opened.ds.splits[cfg.split], schema, cat_loader,
                           time_gap_buckets=_time_gap_buckets(opened.run_cfg)):
        if c.max_requests and sum(x.num_requests for x in batches) >= c.max_requests:
            break
        batches.append(b)
    one_each = all(bool((b.cand_offsets.diff() == 1).all()) for b in batches)
    target = (CatalogTarget.candidates if c.target == RelevantItems.candidates
              or (c.target == RelevantItems.auto and one_each) else CatalogTarget.positives)
    categories = collect_item_categories([p for fs in opened.ds.splits.values() for p in fs], schema)
    catalog = catalog_items(schema, None, categories)
    t0 = time.perf_counter()
    ranks, ranked = catalog_ranks(opened.model, batches, catalog, list(schema.sequences), target, c.exclude_history,
                                  c.candidate_chunk, opened.device, cfg.progress, opened.rank_task)
    cat_s = time.perf_counter() - t0
    hr, ndcg = hr_ndcg_at_k(ranks, c.k)
    m = int(catalog.items.size)
    task = schema.tasks[opened.rank_task]
    score = ("its next-item score" if isinstance(opened.model, SASRecModel) else f"the logit of task {task!r}")
    return {f"hr@{c.k}": hr, f"ndcg@{c.k}": ndcg, "catalog_targets": int(ranks.size), "catalog_requests": ranked,
            "catalog_items": m, "catalog_rank_task": task, "catalog_time_s": cat_s,
            "catalog_items_scored_per_s": ranked * m / cat_s if ranked else None,
            "catalog_protocol": (
                f"every item 1..{schema.num_items - 1} (item 0, the padding id, excluded) ranked by {score} for "
                f"each of the first {ranked} requests of the split with a relevant item; relevant = {target.value} "
                f"of the request (its listed candidates{'' if target == CatalogTarget.candidates else ' labelled 1'}"
                f", item 0 never); seen items {'excluded' if c.exclude_history else 'kept'}; ties by item id; "
                f"HR@{c.k}/NDCG@{c.k} averaged over relevant items (recsys/serving/ranking.py)")}
