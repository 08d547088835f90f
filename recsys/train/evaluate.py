"""Run a model over a split and compute the report metrics."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from recsys.data.batch import RequestBatch
from recsys.model.metrics import auc, binary_report


@dataclass
class Predictions:
    logits: np.ndarray
    """[n, T]"""
    labels: np.ndarray
    """[n, T]"""
    users: np.ndarray
    """[n] user id of each candidate row."""
    items: np.ndarray
    """[n] candidate item id."""
    history_len: np.ndarray
    """[n] S-history length (all kinds) of the candidate's request."""
    true_prob: np.ndarray | None
    """[n, T] planted probabilities (synthetic data) or None."""


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[RequestBatch], device: torch.device,
            max_batches: int = 0, autocast_bf16: bool = False) -> Predictions:
    was_training = model.training
    model.eval()
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("logits", "labels", "users", "items", "hist", "prob")}
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            logits = batch.with_prior(model(batch))  # a residual ranker's prior (train.hard_negatives.prior)
        c = batch.cand_offsets[1:] - batch.cand_offsets[:-1]
        hist = sum(batch.seq_ts[k].lengths().to(torch.int64) for k in batch.seq_ts.keys())
        out["logits"].append(logits.float().cpu().numpy())
        out["labels"].append(batch.labels.cpu().numpy())
        out["users"].append(torch.repeat_interleave(batch.user_id, c).cpu().numpy())
        out["items"].append(batch.cand["item_id"].values().cpu().numpy())
        out["hist"].append(torch.repeat_interleave(hist, c).cpu().numpy())
        if batch.true_prob is not None:
            out["prob"].append(batch.true_prob.cpu().numpy())
    model.train(was_training)
    if not out["logits"]:
        raise ValueError("evaluation split produced no batches")
    cat = {k: np.concatenate(v) if v else None for k, v in out.items()}
    return Predictions(cat["logits"], cat["labels"], cat["users"], cat["items"], cat["hist"], cat["prob"])


def metrics_report(pred: Predictions, tasks: list[str], prefix: str) -> dict[str, float | int | None]:
    """``<prefix>auc/gauc/logloss`` for the first task, ``<prefix><task>_*`` for each task,
    and ``oracle_auc`` (first task) when planted probabilities are known."""
    report: dict[str, float | int | None] = {f"{prefix}rows": int(pred.labels.shape[0]),
                                             f"{prefix}positives": int(pred.labels[:, 0].sum())}
    for t, task in enumerate(tasks):
        per = binary_report(f"{prefix}{task}_", pred.logits[:, t], pred.labels[:, t], pred.users)
        report.update(per)
        if t == 0:
            report.update({k.replace(f"{prefix}{task}_", prefix): v for k, v in per.items()})
        if pred.true_prob is not None:
            report[f"{prefix}{task}_oracle_auc"] = auc(pred.true_prob[:, t], pred.labels[:, t])
    if pred.true_prob is not None:
        report[f"{prefix}oracle_auc"] = report[f"{prefix}{tasks[0]}_oracle_auc"]
    return report
