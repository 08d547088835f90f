"""The comparison table: mean and std over seeds per model, as markdown and JSON, plus a bar chart."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

COLUMNS = [  # (key in a per-run row, header, format)
    ("auc", "AUC", "{:.4f}"), ("gauc", "GAUC", "{:.4f}"), ("logloss", "log loss", "{:.4f}"),
    ("hr@10", "HR@10", "{:.4f}"), ("ndcg@10", "NDCG@10", "{:.4f}"),
    ("train_time_s", "train time (s)", "{:.1f}"), ("train_samples_per_s", "train cand/s", "{:,.0f}"),
    ("score_candidates_per_s", "scoring cand/s", "{:,.0f}"),
]


def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def summarize(rows: list[dict[str, Any]], models: list[str]) -> list[dict[str, Any]]:
    """Per model: ``<key>_mean``, ``<key>_std`` (population std over seeds; None if undefined), ``seeds``."""
    out = []
    for m in models:
        runs = [r for r in rows if r["model"] == m]
        s: dict[str, Any] = {"model": m, "arch": runs[0]["arch"] if runs else None, "seeds": [r["seed"] for r in runs]}
        for key, _, _ in COLUMNS + [("oracle_auc", "", "")]:
            vals = [v for r in runs if (v := _num(r.get(key))) is not None]
            s[f"{key}_mean"] = float(np.mean(vals)) if vals else None
            s[f"{key}_std"] = float(np.std(vals)) if len(vals) > 1 else None
        out.append(s)
    return out


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """One row per model; ``mean ± std`` when several seeds, ``n/a`` when undefined."""
    head = "| model | arch | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 2)]
    for s in summary:
        cells = []
        for key, _, fmt in COLUMNS:
            mean, std = s[f"{key}_mean"], s[f"{key}_std"]
            cell = "n/a" if mean is None else fmt.format(mean)
            if mean is not None and std is not None:
                cell += " ± " + fmt.format(std)
            cells.append(cell)
        lines.append(f"| {s['model']} | {s['arch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
