"""Recall and speed of the approximate item indexes (IVF, HNSW) against the exact one (flat inner product).

recall@K = |ANN top-K  ∩  exact top-K| / K, averaged over queries (the exact index is the oracle; it is
itself pinned to torch brute force by tests/retrieval/test_item_index.py). Item vectors: a mixture of
Gaussian clusters (catalogs cluster; i.i.d. Gaussian vectors are the worst case for any ANN index),
queries drawn the same way. Query time is the median of repeated batched searches, per query.

    python bench/retrieval_ann.py                       # 50k items x 64, 1000 queries: ~1-2 min on 2 cores
    python bench/retrieval_ann.py --items 200000 --tag large

Writes ``bench/results/retrieval_ann[_<tag>].json`` (and prints it) with ``os.getloadavg()`` before and
after: the machine is shared, timings are noisy, recall is not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, median_ms, write_json  # noqa: E402
from recsys.retrieval.index import IndexConfig, IndexKind, ItemIndex  # noqa: E402


def clustered(n: int, d: int, centers: torch.Tensor, spread: float, g: torch.Generator) -> torch.Tensor:
    """``[n, d]`` vectors: a random center ``N(0, I)`` plus ``spread * N(0, I)`` noise (spread 1: the
    noise is as large as the center, clusters overlap)."""
    pick = torch.randint(0, centers.shape[0], (n,), generator=g)
    return centers[pick] + spread * torch.randn(n, d, generator=g)


def recall(ann_ids: torch.Tensor, exact_ids: torch.Tensor) -> float:
    """Mean over queries of ``|ann ∩ exact| / K`` (``[Q, K]`` each)."""
    hits = (ann_ids.unsqueeze(2) == exact_ids.unsqueeze(1)).any(2).sum(1)
    return float(hits.float().mean() / exact_ids.shape[1])


def measure(cfg: IndexConfig, items: torch.Tensor, users: torch.Tensor, exact: dict[int, torch.Tensor],
            ks: list[int], repeats: int) -> dict:
    t0 = time.perf_counter()
    index = ItemIndex(items, config=cfg)
    build_s = time.perf_counter() - t0
    kmax = max(ks)
    ids = index.search(users, kmax)[1]
    ms = median_ms(lambda: index.search(users, kmax), repeats=repeats)
    knobs = {IndexKind.FLAT: {}, IndexKind.IVF: {"nlist": cfg.nlist, "nprobe": cfg.nprobe},
             IndexKind.HNSW: {"hnsw_m": cfg.hnsw_m, "ef_search": cfg.ef_search}}[cfg.kind]
    return {"kind": cfg.kind.value, **knobs, "build_s": round(build_s, 3),
            "query_us_per_request": round(ms * 1e3 / users.shape[0], 2),
            **{f"recall@{k}": round(recall(ids[:, :k], exact[k]), 4) for k in ks}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--clusters", type=int, default=200)
    p.add_argument("--spread", type=float, default=1.0)
    p.add_argument("--ks", default="10,100")
    p.add_argument("--nlist", type=int, default=256)
    p.add_argument("--nprobes", default="1,4,16,64")
    p.add_argument("--efs", default="16,64,256")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    a = p.parse_args()
    load_before = os.getloadavg()
    g = torch.Generator().manual_seed(a.seed)
    centers = torch.randn(a.clusters, a.dim, generator=g)
    items = clustered(a.items, a.dim, centers, a.spread, g)
    users = clustered(a.queries, a.dim, centers, a.spread, g)
    ks = [int(k) for k in a.ks.split(",")]
    flat = IndexConfig()
    exact_ids = ItemIndex(items, config=flat).search(users, max(ks))[1]
    exact = {k: exact_ids[:, :k] for k in ks}
    rows = [measure(flat, items, users, exact, ks, a.repeats)]
    rows += [measure(IndexConfig(kind=IndexKind.IVF, nlist=a.nlist, nprobe=int(n), seed=a.seed),
                     items, users, exact, ks, a.repeats) for n in a.nprobes.split(",")]
    rows += [measure(IndexConfig(kind=IndexKind.HNSW, ef_search=int(e)), items, users, exact, ks, a.repeats)
             for e in a.efs.split(",")]
    out = {"bench": "retrieval_ann", "items": a.items, "dim": a.dim, "queries": a.queries,
           "clusters": a.clusters, "spread": a.spread, "seed": a.seed, "machine": machine(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "loadavg_before": load_before,
           "loadavg_after": os.getloadavg(), "results": rows}
    path = write_json("retrieval_ann" + (f"_{a.tag}" if a.tag else ""), out)
    print(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
