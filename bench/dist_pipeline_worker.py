"""One rank of ``bench/dist_throughput.py --pipeline``: eager vs torchrec-pipelined steps, interleaved in one launch.

    torchrun --nproc_per_node 2 bench/dist_pipeline_worker.py <out.json> <steps> <repeats> <hydra overrides...>

Every rank pre-reads its ``steps`` batches of the synthetic train split (production loader, full batches;
cycled when the split is short), so reading is outside both timings. Per repeat and per driver
(``recsys.dist.pipeline.Eager`` / ``SparseDistPipeline``, in alternating order) a fresh sharded ranker from the
same seed trains on them; the step times (``time.perf_counter`` around each call, the slowest rank's per step,
first 2 steps dropped as warm-up) go to rank 0's JSON. Then one profiled pass per driver (torch profiler,
not timed) measures how much all-to-all time runs while the main thread computes (see :func:`overlap`).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path
from statistics import median

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from recsys.baselines.factory import build_model, max_s_tokens
from recsys.data import RequestLoader, prepare_dataset
from recsys.dist.pipeline import Eager, SparseDistPipeline
from recsys.dist.strategy import Distributed
from recsys.train.config import register_configs
from recsys.train.step import Trainer

ROOT = Path(__file__).resolve().parents[1]
A2A = ("all_to_all", "alltoall")
"""Profiler event names of the all-to-alls (the tables' input and output dist; gloo runs them on its own threads)."""
COMM = (*A2A, "allreduce", "all_reduce", "gloo:", "c10d::", "record_param_comms")
"""Every collective (never counted as compute)."""
WAIT = ("wait", "## ")  # main-thread waits and torchrec's record_function ranges: not compute


def setup(overrides: list[str], steps: int):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=["dist=gloo", *overrides]))
    par = Distributed(cfg.dist)
    ds = prepare_dataset(cfg.data, progress=False, need=("train",)) if par.main else None
    par.barrier()
    ds = ds or prepare_dataset(cfg.data, progress=False, need=("train",))
    lcfg = replace(cfg.data.loader, drop_last=True)
    read = list(islice(RequestLoader(ds.splits["train"], ds.schema, lcfg, rank=par.rank, world_size=par.world,
                                     time_gap_buckets=cfg.model.time_gap_buckets), steps))
    have = torch.tensor([len(read)])
    dist.all_reduce(have, op=dist.ReduceOp.MIN)  # every rank the same number of distinct batches
    read = read[:int(have)]
    batches = [read[i % len(read)] for i in range(steps)]
    s_max = max_s_tokens(ds.schema, cfg.model, cfg.data.loader.max_len)
    return cfg, par, ds.schema, s_max, batches


def make(cfg, par, schema, s_max, pipelined: bool):
    torch.manual_seed(cfg.train.seed)
    oc = cfg.train.optim
    module, opt = par.wrap(build_model(schema, cfg.model, s_max), oc, lambda s: 1.0)
    trainer = Trainer(module, par, opt, None, False, oc.clip_grad_norm)
    if pipelined:
        return SparseDistPipeline(module, opt.dense, par.device, trainer.forward, trainer.update)
    return Eager(trainer.step)


def timed(driver, batches) -> list[float]:
    it, out = iter(batches), []
    for _ in batches:
        t0 = time.perf_counter()
        driver.step(it)
        out.append(time.perf_counter() - t0)
    driver.close()
    slowest = torch.tensor(out, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
    return slowest.tolist()


def _union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def overlap(prof) -> dict[str, float]:
    """All-to-all time (ms, union of the intervals of events named like :data:`A2A`, any thread) split into the
    part that runs while the main thread executes a compute op (a top-level op that is neither a collective nor
    a wait nor a record_function range) and the rest ("serialized": the main thread waits or does bookkeeping).
    Written by hand: the profiler gives events, not an overlap figure."""
    events = [e for e in prof.events() if e.time_range.end > e.time_range.start]
    main = max({e.thread for e in events}, key=lambda t: sum(1 for e in events if e.thread == t))
    comm = _union([(e.time_range.start, e.time_range.end) for e in events if any(c in e.name for c in A2A)])
    compute = _union([(e.time_range.start, e.time_range.end) for e in events if e.thread == main
                      and e.name.startswith("aten::") and not any(c in e.name for c in COMM + WAIT)])
    inter, j = 0.0, 0
    for a, b in comm:
        while j < len(compute) and compute[j][1] <= a:
            j += 1
        k = j
        while k < len(compute) and compute[k][0] < b:
            inter += min(b, compute[k][1]) - max(a, compute[k][0])
            k += 1
    total = sum(b - a for a, b in comm)
    return {"comm_ms": total / 1e3, "concurrent_with_compute_ms": inter / 1e3,
            "serialized_ms": (total - inter) / 1e3, "concurrent_fraction": inter / total if total else 0.0}


def profiled(driver, batches) -> dict[str, float]:
    it = iter(batches)
    driver.step(it)  # the pipeline's first call fills it and rewrites the model: outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in batches[1:]:
            driver.step(it)
    driver.close()
    res = overlap(prof)
    res["steps"] = len(batches) - 1
    return res


def main(out: Path, steps: int, repeats: int, overrides: list[str]) -> None:
    cfg, par, schema, s_max, batches = setup(overrides, steps)
    times: dict[str, list[float]] = {"none": [], "sparse_dist": []}
    for r in range(repeats):
        for pipelined in ((False, True) if r % 2 == 0 else (True, False)):
            times["sparse_dist" if pipelined else "none"] += timed(make(cfg, par, schema, s_max, pipelined),
                                                                   batches)[2:]
    prof = {name: profiled(make(cfg, par, schema, s_max, name == "sparse_dist"), batches[:min(steps, 8)])
            for name in ("none", "sparse_dist")}
    if par.main:
        summary = {name: {"step_ms_median": 1e3 * median(v), "steps_timed": len(v), "profile": prof[name]}
                   for name, v in times.items()}
        summary["speedup_pipelined"] = summary["none"]["step_ms_median"] / summary["sparse_dist"]["step_ms_median"]
        out.write_text(json.dumps({"summary": summary, "step_s": times, "world_size": par.world,
                                   "batches_distinct": len({id(b) for b in batches})}))
    par.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
