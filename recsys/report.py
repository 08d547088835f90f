"""`python -m recsys.report <report.json>`: print the headline figures of a run as a table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADLINE = [
    ("test_auc", "test AUC ({task})"), ("oracle_auc", "oracle AUC (planted probabilities)"),
    ("popularity_auc", "popularity-only AUC"), ("test_gauc", "test GAUC"), ("test_logloss", "test log loss"),
    ("hr@10", "HR@10"), ("ndcg@10", "NDCG@10"),
    ("train_samples_per_s", "train samples/s"), ("train_time_s", "train time (s)"), ("steps", "steps"),
]


def format_report(report: dict) -> str:
    task = (report.get("tasks") or ["first task"])[0]
    rows = []
    for key, label in HEADLINE:
        if key in report and report[key] is not None:
            v = report[key]
            rows.append((label.format(task=task), f"{v:.4f}" if isinstance(v, float) else str(v)))
    width = max(len(r[0]) for r in rows) if rows else 0
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m recsys.report <report.json>", file=sys.stderr)
        return 2
    path = Path(argv[0])
    if not path.is_file():
        print(f"no report at {path}", file=sys.stderr)
        return 2
    print(f"report {path}:\n{format_report(json.loads(path.read_text()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
