"""``report.json`` of a training run: test and validation metrics of the trained (unsharded) model, the
count-based popularity AUC, throughput, guard counts, model size, and how the run was spread over ranks.
The same keys for one process and N ranks (``world_size``, ``backend``, ``sharding`` say which)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from recsys.dist.optim import split_parameters
from recsys.model.metrics import auc
from recsys.model.pyramid import flops_report
from recsys.model.ranker import OneTransRanker
from recsys.reliability.atomic import atomic_write_bytes
from recsys.reliability.digest import json_default
from recsys.train.evaluate import metrics_report, predict
from recsys.train.rundir import plain_config


def model_facts(model: torch.nn.Module, s_max: int, cfg: Any) -> dict[str, Any]:
    """Parameter counts (tables vs the rest) and, for the ranker, its pyramid and FLOPs per request."""
    sparse, dense = split_parameters(model)
    ranker = isinstance(model, OneTransRanker)
    return {
        "params_dense": sum(p.numel() for p in dense), "params_sparse": sum(p.numel() for p in sparse),
        "pyramid": model.schedule.describe() if ranker else None,
        "flops_per_request": flops_report(model.schedule, s_max, model.tokenizer.n_ns, 1, cfg.d_model,
                                          cfg.ffn_mult * cfg.d_model) if ranker else None,
    }


def write_report(path: Path, run: Any, model: torch.nn.Module, positives: torch.Tensor, train_time: float,
                 resumed_from: Path | None) -> None:
    """Rank 0 (or the one process): evaluate ``model`` and write ``path`` atomically.

    ``run``: the ``recsys.train.loop.Run``; ``positives [M]``: positives per item in the first epoch over
    all ranks (the count-based popularity score); ``train_time``: the slowest rank's step time.
    """
    cfg, schema, p = run.cfg, run.schema, run.progress
    valid = run.validate(model)
    test_pred = predict(model, run.eval_batches("test"), run.par.device, 0, cfg.train.bf16)
    test = metrics_report(test_pred, schema.tasks, "test_")
    report: dict[str, Any] = {
        **test, **valid,
        "oracle_auc": test.get("test_oracle_auc"),  # None unless the data carries planted probabilities
        "popularity_auc": auc(positives[torch.as_tensor(test_pred.items)].numpy(), test_pred.labels[:, 0]),
        "train_samples_per_s": p.samples / max(train_time, 1e-9),
        "train_requests_per_s": p.requests / max(train_time, 1e-9),
        "train_time_s": train_time, "steps": p.step, "train_samples": p.samples,
        "resumed_from": str(resumed_from) if resumed_from else None,
        **run.guard.report(), **run.stopper.report(),
        **model_facts(model, run.s_max, cfg.model),
        **run.par.describe(), "dropped_rows_per_epoch_max": run.dropped,
        "tasks": list(schema.tasks), "data": run.ds.summary, "device": str(run.par.device),
        "config": plain_config(cfg),
    }
    atomic_write_bytes(path, json.dumps(report, indent=2, default=json_default).encode())
