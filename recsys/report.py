"""`python -m recsys.report <json> [<json> ...]`: print the headline figures of a run.

Takes the training report (``recsys.train``) and any scoring summaries (``recsys.score``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TRAIN = [
    ("test_auc", "test AUC (first task, pooled)"), ("oracle_auc", "oracle AUC (planted probabilities)"),
    ("popularity_auc", "popularity-only AUC"), ("test_gauc", "test GAUC"), ("test_logloss", "test log loss"),
    ("train_samples_per_s", "train samples/s"), ("train_time_s", "train time (s)"), ("steps", "steps"),
    ("pyramid", "pyramid S queries per layer"),
]
RETRIEVER = [("valid_recall_catalog", "catalog items"), ("train_samples_per_s", "train samples/s"),
             ("train_time_s", "train time (s)"), ("steps", "steps")]
"""After its ``valid_recall@<K>`` (K = ``model.retrieval.recall_k``)."""
RETRIEVER_ARCHS = {"two_tower": ("two-tower", "exact top"), "sid_decoder": ("SID decoder", "beam-search top")}
"""A training report of these archs is a retriever's: (its name, how its top K is found)."""
SCORE = [("auc", "AUC"), ("gauc", "GAUC"), ("logloss", "log loss"), ("hr@10", "HR@10"), ("ndcg@10", "NDCG@10")]
CASCADE_PREFIXES = ("recall@", "hr@10_", "ndcg@10_")
"""Cascade summaries add recall@<K>_<retriever> / _union and each retriever alone (hr@10_<kind>, ...)."""
SCORE_TOP = [("requests_per_s", "requests/s"), ("candidates_per_s", "candidates/s"),
             ("cache_hit_rate", "user KV-cache hit rate")]


def _rows(src: dict[str, Any], keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for key, label in keys:
        v = src.get(key)
        if v is not None:
            out.append((label, f"{v:.4f}" if isinstance(v, float) else str(v)))
    return out


def format_report(report: dict[str, Any]) -> str:
    if "mode" in report:  # a scoring summary
        title = f"scoring ({report['mode']} mode, {report.get('requests')} requests)"
        metrics = report.get("metrics", {})
        extra = [(k, k) for k in metrics if k.startswith(CASCADE_PREFIXES)]
        rows = _rows(metrics, SCORE + extra) + _rows(report, SCORE_TOP)
        if report.get("protocol"):
            rows.append(("protocol", report["protocol"]))
    elif (arch := report.get("config", {}).get("model", {}).get("arch")) in RETRIEVER_ARCHS:
        title = f"retriever training ({RETRIEVER_ARCHS[arch][0]})"
        recall = [(k, f"{k.removeprefix('valid_')} (positives in the {RETRIEVER_ARCHS[arch][1]} {k.split('@')[1]})")
                  for k in report if k.startswith("valid_recall@")]
        rows = _rows(report, recall + RETRIEVER)
        if "valid_beam_certified" in report:
            rows += _rows(report, [("valid_beam_certified", "share of requests whose beam top K is certified exact")])
        if (es := report.get("early_stopping")) is not None:
            end = f"stopped at step {es['stopped_at_step']}" if es["stopped_at_step"] else "not stopped early"
            end += ", its weights restored" if es.get("restored_best") else ""
            rows.append(("early stopping", f"{es['metric']} best at step {es['best_step']}, {end}"))
    else:
        title = f"training (tasks {report.get('tasks')})"
        rows = _rows(report, TRAIN)
    width = max((len(r[0]) for r in rows), default=0)
    return "\n".join([title] + [f"  {k.ljust(width)}  {v}" for k, v in rows])


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m recsys.report <report.json> [<summary.json> ...]", file=sys.stderr)
        return 2
    for arg in argv:
        path = Path(arg)
        if not path.is_file():
            print(f"no report at {path}", file=sys.stderr)
            return 2
        print(format_report(json.loads(path.read_text())))
        print(f"  ({path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
