"""Peak memory per rank of building the sharded ranker: tables on meta vs the full plain model (gloo, CPU).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/dist_memory.py [--rows 10000000] [--dim 32] [--paths meta,full]

One item table of ``--rows x --dim`` float32 rows (the ranker's ``item_id_table``; the other tables are the
tiny schema's), row-wise sharded over 2 gloo ranks (``torch.multiprocessing`` spawn; fresh processes per
path, so each peak is that path's own). Paths, in one run, one after the other:

* ``meta``: ``recsys.dist.sharding.build_sharded_ranker`` -- tables built on meta, DMP allocates each
  rank's shard and fills it from the seeded init;
* ``full``: the old path -- ``build_model`` (every table whole, on every rank), then ``shard_ranker``
  (= ``shard_model``: a clone of the full state is copied into the shards).

Per rank: ``ru_maxrss`` (``resource.getrusage(RUSAGE_SELF)``) and ``VmHWM`` (``/proc/self/status``) after
the build, the RSS before it (imports + process group), the build time, and a float64 checksum of the
rank's item-table shard (equal between the paths: the same initial rows). No training step: what is
measured is the build. Writes ``bench/results/<--name>.json`` (default ``dist_memory``) with ``os.getloadavg()`` before and after.
Memory-bound: the ``full`` path needs about ``2.5 x`` the table per rank, twice (2 ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
MAX_LEN = 12
MIB = 1 << 20


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_mib(field: str) -> float:
    """``VmHWM`` / ``VmRSS`` of this process from ``/proc/self/status``, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _build(path: str, rows: int, dim: int) -> tuple[Any, float]:
    from recsys.baselines.factory import build_model
    from recsys.dist.config import DistConfig
    from recsys.dist.sharding import build_sharded_ranker, shard_ranker
    from recsys.model.config import ModelConfig
    from recsys.testing import tiny_schema

    schema = replace(tiny_schema(), num_items=rows)
    debug = OmegaConf.load(ROOT / "configs" / "model" / "debug.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), debug, {"emb_dim": dim}))
    s_max = len(schema.sequences) * MAX_LEN
    dcfg = DistConfig(backend="gloo", sharding="row_wise")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if path == "meta":
        dmp, _ = build_sharded_ranker(schema, cfg, s_max, dcfg, torch.device("cpu"), "rowwise_adagrad", 0.05)
    else:
        dmp, _ = shard_ranker(build_model(schema, cfg, s_max), dcfg, torch.device("cpu"), "rowwise_adagrad", 0.05)
    return dmp, time.perf_counter() - t0


def rank_main(rank: int, path: str, rows: int, dim: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import recsys.dist.sharding  # noqa: F401  (imports counted in the baseline, not in the build)

        rss_before = proc_status_mib("VmRSS")
        dmp, seconds = _build(path, rows, dim)
        rec = {"rank": rank, "rss_before_build_mib": round(rss_before, 1),
               "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "vm_hwm_mib": round(proc_status_mib("VmHWM"), 1), "rss_after_mib": round(proc_status_mib("VmRSS"), 1),
               "build_s": round(seconds, 2)}
        weight = next(v for k, v in dmp.state_dict().items() if k.endswith("item_id_table.weight"))
        shards = weight.local_shards()
        rec["item_shards"] = [[list(s.metadata.shard_offsets), list(s.metadata.shard_sizes)] for s in shards]
        rec["item_shard_checksum"] = sum(float(s.tensor.double().sum()) for s in shards)
        Path(out, f"{path}_rank{rank}.json").write_text(json.dumps(rec))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_path(path: str, rows: int, dim: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(rank_main, args=(path, rows, dim, _port(), out), nprocs=WORLD, join=True)
        return [json.loads(Path(out, f"{path}_rank{r}.json").read_text()) for r in range(WORLD)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--paths", default="meta,full", help="comma-separated: meta, full (run in this order)")
    ap.add_argument("--name", default="dist_memory", help="results file: bench/results/<name>.json")
    args = ap.parse_args()
    paths = args.paths.split(",")
    if not set(paths) <= {"meta", "full"}:
        raise SystemExit(f"--paths: meta and/or full, got {args.paths!r}")
    table_mib = args.rows * args.dim * 4 / MIB
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    for path in paths:
        ranks = run_path(path, args.rows, args.dim)
        peak = max(r["vm_hwm_mib"] for r in ranks)
        growth = max(r["vm_hwm_mib"] - r["rss_before_build_mib"] for r in ranks)
        results[path] = {"ranks": ranks, "peak_mib_max_rank": peak, "peak_over_table": round(peak / table_mib, 3),
                         "growth_mib_max_rank": round(growth, 1), "growth_over_table": round(growth / table_mib, 3)}
        print(f"{path:>5}: peak per rank {[r['vm_hwm_mib'] for r in ranks]} MiB (ru_maxrss "
              f"{[r['ru_maxrss_mib'] for r in ranks]}), before build {[r['rss_before_build_mib'] for r in ranks]}, "
              f"build {[r['build_s'] for r in ranks]} s; peak / table {peak / table_mib:.2f}, "
              f"growth / table {growth / table_mib:.2f}", flush=True)
    if len(results) == 2:  # the same initial rows on each rank, whichever path built them
        same = [a["item_shard_checksum"] == b["item_shard_checksum"] and a["item_shards"] == b["item_shards"]
                for a, b in zip(results["meta"]["ranks"], results["full"]["ranks"])]
        results["same_initial_shards"] = all(same)
        print(f"same initial item-table shards on every rank: {all(same)}")
    payload = {"rows": args.rows, "dim": args.dim, "world_size": WORLD, "sharding": "row_wise",
               "table_mib": round(table_mib, 1), **results, "loadavg_before": load_before,
               "loadavg_after": os.getloadavg(), "machine": machine()}
    print(write_json(args.name, payload))


if __name__ == "__main__":
    main()
