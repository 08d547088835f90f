"""``summary.json`` of a scoring job: metrics over every partition on disk, counters of this run.

The metrics are computed from the partition files, never from a process's running state, so a resumed
run, or a run whose partitions were written by several ranks, reports the whole output.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.model.metrics import auc, gauc, hr_ndcg_at_k, logloss
from recsys.serving.cache import CacheStats
from recsys.serving.partitions import PART_PREFIX


def read_partitions(output_dir: Path) -> pl.DataFrame | None:
    """Every ``part-*.parquet`` of ``output_dir`` in partition order (None when there is none)."""
    files = sorted(output_dir.glob(f"{PART_PREFIX}*.parquet"))
    return pl.read_parquet(files) if files else None


def candidate_metrics(df: pl.DataFrame, tasks: list[str]) -> dict[str, Any]:
    """AUC / GAUC / logloss per task over candidate rows (``score_<task>``, ``label_<task>``, ``user_id``);
    ``auc`` / ``gauc`` / ``logloss`` repeat the first task's. Undefined values are None."""
    out: dict[str, Any] = {"output_rows": df.height}
    users = df["user_id"].to_numpy()
    for task in tasks:
        p, y = df[f"score_{task}"].to_numpy(), df[f"label_{task}"].to_numpy()
        g, n_users = gauc(p, y, users)
        out.update({f"{task}_auc": auc(p, y), f"{task}_gauc": g, f"{task}_gauc_users": n_users,
                    f"{task}_logloss": logloss(p, y)})
    first = tasks[0]
    out.update({"auc": out[f"{first}_auc"], "gauc": out[f"{first}_gauc"], "logloss": out[f"{first}_logloss"]})
    return finite(out)


def catalog_metrics(df: pl.DataFrame, k: int) -> dict[str, Any]:
    """HR@k / NDCG@k over the target rows of catalog output (``is_target``, ``rank``; -1 = outside the set)."""
    targets = df.filter(pl.col("is_target"))
    inside = targets.filter(pl.col("rank") >= 0)
    hr, ndcg = hr_ndcg_at_k(inside["rank"].to_numpy(), k)
    return finite({"output_rows": df.height, f"hr@{k}": hr, f"ndcg@{k}": ndcg, "targets": inside.height,
                   "targets_outside_candidate_set": targets.height - inside.height,
                   "requests_ranked": df["request_id"].n_unique()})


def cascade_metrics(df: pl.DataFrame, names: list[str], retrieve_k: int, k: int) -> dict[str, Any]:
    """Over the target rows of cascade output: recall@``retrieve_k`` of each retriever and of the union
    (fraction of targets it retrieved, averaged over targets), HR@k / NDCG@k of the re-ranked union
    (a target no retriever found, rank -1, is a miss), and ``hr@k_<name>`` / ``ndcg@k_<name>`` of each
    retriever's own list (``rank_<name>``; only where ``k <= retrieve_k`` is that the retriever's full HR@k)."""
    targets = df.filter(pl.col("is_target"))
    found = targets["retrieved_by"].to_list()
    out: dict[str, Any] = {"output_rows": df.height, "targets": targets.height,
                           "requests_ranked": df["request_id"].n_unique()}
    for name in names:
        out[f"recall@{retrieve_k}_{name}"] = (float(np.mean([name in f.split("+") for f in found]))
                                              if found else None)
    out[f"recall@{retrieve_k}_union"] = float(np.mean([f != "" for f in found])) if found else None
    miss = np.iinfo(np.int64).max // 2
    rank = targets["rank"].to_numpy()
    hr, ndcg = hr_ndcg_at_k(np.where(rank < 0, miss, rank), k)
    out.update({f"hr@{k}": hr, f"ndcg@{k}": ndcg})
    for name in names:  # each retriever alone: its own order of its own top retrieve_k
        if f"rank_{name}" in targets.columns:
            own = targets[f"rank_{name}"].to_numpy()
            hr, ndcg = hr_ndcg_at_k(np.where(own < 0, miss, own), k)
            out.update({f"hr@{k}_{name}": hr, f"ndcg@{k}_{name}": ndcg})
    return finite(out)


def finite(d: dict[str, Any]) -> dict[str, Any]:
    """NaN / inf values -> None (JSON has no NaN)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def merge_cache_stats(per_rank: list[dict[str, int] | None]) -> dict[str, Any]:
    """``CacheStats`` fields (``dataclasses.asdict``) of every rank -> one ``as_dict``: counters summed,
    ``peak_bytes`` the largest, rates recomputed; {} when no rank had a cache."""
    present = [s for s in per_rank if s is not None]
    if not present:
        return {}
    merged = {k: sum(s[k] for s in present) for k in present[0]}
    merged["peak_bytes"] = max(s["peak_bytes"] for s in present)
    return CacheStats(**merged).as_dict()
