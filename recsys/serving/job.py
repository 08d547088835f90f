"""The batch scoring job behind ``python -m recsys.score``: checkpoint + request files -> scored partitions.

Steps: load the ranker from a checkpoint (``recsys.serving.load``); list the inputs (the checkpoint's
dataset split by default; ``recsys.serving.inputs``); plan deterministic partitions
(``recsys.serving.partitions``); for every partition not already on disk: read its rows (validated,
collated and truncated exactly like the training loader; ``recsys.serving.reader`` + ``collate``), turn
them into output rows batch by batch with the configured mode (``recsys.serving.modes``: the request's
candidates, or the whole catalog), write the partition atomically; finally compute the metrics over
*all* partitions on disk and write ``summary.json`` (``recsys.serving.summary``).

Several processes: under ``torchrun --nproc_per_node N -m recsys.score ...`` rank 0 opens the job as
one process would (checks, output directory lock, ``_job.json``, the list of partitions still to
write) while the other ranks wait for its outcome (a refusal reaches every rank: ``JobGroup.on_rank0``);
the remaining partitions are dealt round-robin (rank ``r`` writes the ``r``-th, ``r + N``-th, ...);
after a barrier rank 0 writes the summary from the partition files. A partition's bytes depend on its
rows only (the cache is reset per partition), not on the rank or the process count, so a rerun after
a kill of any rank, with any number of processes, completes the same output.

Outputs speak the ids of the user's catalog too: when the scored rows' dataset has id maps
(``recsys.data.id_maps``: ingested event logs, ml-100k), every partition carries ``raw_user_id`` and
``raw_item_id`` next to ``user_id`` / ``item_id`` (null for the unknown id 0); synthetic data has no
raw ids. ``inputs_eventlog`` scores a new log of the checkpoint's catalog, encoded with the stored maps
of the checkpoint's dataset (``data.eventlog.id_maps_from``; unknown ids by ``oov_policy``, counted).

Before the output directory is created or written, the job checks that it overlaps none of its
inputs (request files, dataset, checkpoint; ``recsys.reliability.rundir``) and that ``max_len``
is the trained one; the directory is then locked for the job's lifetime (by rank 0).
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from kernels.backend import AttentionBackend
from recsys.data.collate import collate
from recsys.data.id_features import TIME_GAP_BUCKETS
from recsys.data.id_maps import with_raw_ids
from recsys.data.schema import DataSchema
from recsys.longseq.cache import LongMemoryCache
from recsys.model.ranker import OneTransRanker
from recsys.reliability.atomic import atomic_write_bytes
from recsys.reliability.device import resolve_device
from recsys.reliability.digest import json_default
from recsys.reliability.rundir import check_output_dir, lock_run_dir
from recsys.runtime.allocator import keep_freed_memory
from recsys.serving.cache import UserKVCache
from recsys.serving.config import ScoreConfig, ScoreMode
from recsys.serving.group import JobGroup, job_group
from recsys.serving.inputs import ScoreInputs, job_inputs, resolve_inputs, scoring_max_len, trained_dataset
from recsys.serving.load import load_ranker, resolve_checkpoint
from recsys.serving.modes import ModeContext, ScoringMode, build_mode
from recsys.serving.partitions import Partition, finished, plan_partitions, prepare_output, write_partition
from recsys.serving.reader import PartitionReader
from recsys.serving.scorer import CachedScorer
from recsys.serving.summary import merge_cache_stats, read_partitions


@dataclass
class OpenedJob:
    """What a scoring job resolved and checked before it touches its output directory."""

    device: torch.device
    ckpt: Path
    model: OneTransRanker
    schema: DataSchema
    ckpt_config: dict[str, Any]
    max_len: int
    inputs: ScoreInputs
    out_dir: Path
    scorer: CachedScorer
    """This process's scorer and its caches (reset per partition when ``cache.reset_per_partition``)."""
    mode: ScoringMode


@dataclass
class JobPlan:
    """Rank 0's view of the output directory when the job started (the same on every rank)."""

    parts: list[Partition]
    """Every partition of the job."""
    skipped: int
    """Partitions already on disk (written by an earlier run)."""
    todo: list[Partition]
    """Partitions this run writes (all ranks together; ``max_partitions`` applied)."""


@dataclass
class RankRun:
    """What one rank did: the counters of ``summary.json``."""

    partitions: int = 0
    requests: int = 0
    candidates: int = 0
    score_time_s: float = 0.0
    loop_time_s: float = 0.0
    stage_time_s: dict[str, float] = field(default_factory=dict)
    """The mode's stages (``ScoringMode.stage_times``) and ``write`` (partition files), seconds."""
    counts: dict[str, int] = field(default_factory=dict)
    """``ScoringMode.counts``."""
    cache: dict[str, int] | None = field(default=None)
    """``CacheStats`` fields (None: cache disabled)."""


def run_scoring(cfg: ScoreConfig) -> Path:
    """Run (or resume) the job, in this process or as one rank of torchrun's; returns ``summary.json``'s path."""
    keep_freed_memory()  # every batch reuses the last one's memory instead of faulting it in again
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        with job_group() as group:
            return _run(cfg, group)
    finally:
        torch.set_num_threads(threads)


def open_job(cfg: ScoreConfig, group: JobGroup) -> OpenedJob:
    """Resolve and check everything (checkpoint, model, ``max_len``, inputs, output directory, the mode's
    settings: a bad ``catalog.rank_task`` or ``items_file`` is refused here); writes nothing."""
    device = group.device(resolve_device(cfg.device))
    ckpt = resolve_checkpoint(cfg.checkpoint)
    model, schema, ckpt_config = load_ranker(ckpt, device, cfg.attention_backend, cfg.item_content)
    max_len = scoring_max_len(cfg, ckpt_config, ckpt)
    inputs = resolve_inputs(cfg, ckpt_config)
    out_dir = check_output_dir(cfg.output_dir, job_inputs(cfg, ckpt, inputs.dataset_dirs))
    cache = UserKVCache(cfg.cache.max_bytes) if cfg.cache.enabled else None
    memory_cache = None  # model.long_seq.memory: keep per-user VQ memory states beside the KV cache
    if cache is not None and model.tokenizer.long is not None and model.tokenizer.long.memory is not None:
        memory_cache = LongMemoryCache()
    scorer = CachedScorer(model, cache, cfg.candidate_chunk, memory_cache=memory_cache)
    mode = build_mode(ModeContext(cfg, scorer, schema, inputs, device, ckpt_config.get("dataset_dir"),
                                  ckpt_config.get("score_prior")))
    return OpenedJob(device, ckpt, model, schema, ckpt_config, max_len, inputs, out_dir, scorer, mode)


def _run(cfg: ScoreConfig, group: JobGroup) -> Path:
    t_start = time.perf_counter()
    with ExitStack() as held:  # rank 0 holds the output directory's lock until the summary is written
        mine: list[OpenedJob] = []

        def prepare() -> JobPlan:  # rank 0, before any other rank reads or writes anything
            mine.append(open_job(cfg, group))
            held.enter_context(lock_run_dir(mine[0].out_dir))
            return plan_job(cfg, mine[0])

        plan = group.on_rank0(prepare)
        opened = mine[0] if mine else open_job(cfg, group)  # the other ranks: rank 0 built any dataset
        run = score_partitions(cfg, opened, plan.todo[group.rank::group.world], group.rank)
        runs = group.gather(run)
        group.barrier()  # every partition of this run is on disk
        return group.on_rank0(lambda: write_summary(cfg, opened, plan, runs, t_start))


def job_record(cfg: ScoreConfig, opened: OpenedJob) -> dict[str, Any]:
    """Everything that changes the output bytes: ``_job.json``'s fingerprint (never the process count)."""
    files = opened.inputs.files
    job = {"checkpoint": checkpoint_identity(opened.ckpt), "inputs": [(str(f), f.stat().st_size) for f in files],
           "mode": cfg.mode.value, "max_len": opened.max_len, "rows_per_partition": cfg.rows_per_partition,
           "batch_size": cfg.batch_size, "candidate_chunk": cfg.candidate_chunk,
           "attention_backend": AttentionBackend(opened.model.backend).value, "device": opened.device.type,
           "cache": asdict(cfg.cache), "catalog": asdict(cfg.catalog) if cfg.mode != ScoreMode.candidates else None}
    if cfg.mode == ScoreMode.cascade:  # the retrievers' files and fingerprints, retrieve_k, top_n, exclusion
        job["cascade"] = opened.mode.record  # type: ignore[attr-defined]
    if opened.inputs.id_maps is not None:  # the partitions carry raw-id columns: a part of what they hold
        job["raw_ids"] = str(opened.inputs.id_maps.path)
    return job


def checkpoint_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def plan_job(cfg: ScoreConfig, opened: OpenedJob) -> JobPlan:
    """Rank 0, under the lock: the partition plan, ``_job.json`` (``prepare_output``), what is left to write."""
    parts = plan_partitions(opened.inputs.files, cfg.rows_per_partition)
    prepare_output(opened.out_dir, job_record(cfg, opened), parts, cfg.overwrite)
    done = finished(opened.out_dir, parts)
    todo = [p for p in parts if p.index not in done]
    return JobPlan(parts, len(done), todo[:cfg.max_partitions] if cfg.max_partitions else todo)


def score_partitions(cfg: ScoreConfig, opened: OpenedJob, parts: list[Partition], rank: int = 0) -> RankRun:
    """Score and write ``parts`` (this rank's share) with ``opened.mode``; returns this rank's counters."""
    schema, device, mode = opened.schema, opened.device, opened.mode
    cache, memory_cache = opened.scorer.cache, opened.scorer.memory_cache
    long_max_len = int(opened.ckpt_config["data"]["loader"].get("long_max_len") or 0)  # model.long_seq
    long_max_len = max(long_max_len, opened.max_len) if long_max_len else 0
    reader, run, write_s = PartitionReader(schema), RankRun(), 0.0
    gap_buckets = int(opened.ckpt_config["model"].get("time_gap_buckets", TIME_GAP_BUCKETS))  # as trained
    t_loop = time.perf_counter()
    bar = tqdm(total=sum(p.num_rows for p in parts), disable=not cfg.progress, desc=f"score[{rank}]", unit="req",
               dynamic_ncols=True, position=rank)
    for part in parts:
        if cache is not None and cfg.cache.reset_per_partition:
            cache.clear()
            if memory_cache is not None:
                memory_cache.clear()
        table = reader.read(part)
        pieces: list[dict[str, np.ndarray]] = []
        for s in range(0, table.num_rows, cfg.batch_size):
            batch = collate(table.slice(s, cfg.batch_size), schema, opened.max_len, long_max_len, gap_buckets).to(device)
            t0 = time.perf_counter()
            pieces.append(mode.rows(batch))
            run.score_time_s += time.perf_counter() - t0
            run.candidates += mode.candidates(batch)
            run.requests += batch.num_requests
            bar.update(batch.num_requests)
        t0 = time.perf_counter()
        cols = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
        write_partition(opened.out_dir / part.name, pa.table(with_raw_ids(cols, opened.inputs.id_maps)))
        write_s += time.perf_counter() - t0
        run.partitions += 1
        if cfg.pause_after_partition_s:
            time.sleep(cfg.pause_after_partition_s)
    bar.close()
    run.loop_time_s = time.perf_counter() - t_loop
    run.stage_time_s, run.counts = {**mode.stage_times, "write": write_s}, dict(mode.counts)
    run.cache = asdict(cache.stats) if cache is not None else None
    return run


def _summed(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-key sums over ranks (this run's stage seconds and counters; all ranks' time together)."""
    keys = dict.fromkeys(k for d in per_rank for k in d)  # every rank's keys (a rank with no work may lack some)
    return {k: sum(d.get(k, 0) for d in per_rank) for k in keys}


def write_summary(cfg: ScoreConfig, opened: OpenedJob, plan: JobPlan, runs: list[RankRun], t_start: float) -> Path:
    """Rank 0, after every rank's partitions are on disk: ``summary.json``, metrics over every partition file."""
    out_dir, parts, mode = opened.out_dir, plan.parts, opened.mode
    n_req, n_cand = sum(r.requests for r in runs), sum(r.candidates for r in runs)
    loop_time = max(r.loop_time_s for r in runs)  # wall time: the ranks run side by side
    score_time = sum(r.score_time_s for r in runs)  # model time, all ranks (throughput: per rank, summed)
    stats = merge_cache_stats([r.cache for r in runs])
    remaining = len(parts) - len(finished(out_dir, parts))
    df = read_partitions(out_dir)
    summary: dict[str, Any] = {
        "mode": cfg.mode.value, "checkpoint": str(opened.ckpt), "inputs": [str(f) for f in opened.inputs.files],
        "output_dir": str(out_dir.resolve()), "device": opened.device.type, "world_size": len(runs),
        "attention_backend": AttentionBackend(opened.model.backend).value, "threads": torch.get_num_threads(),
        "complete": remaining == 0, "partitions_total": len(parts), "partitions_written": len(plan.todo),
        "partitions_skipped": plan.skipped, "partitions_remaining": remaining,
        "partitions_per_rank": [r.partitions for r in runs],
        "requests": n_req, "candidates": n_cand, "loop_time_s": loop_time, "score_time_s": score_time,
        "requests_per_s": n_req / loop_time if n_req else None,
        "candidates_per_s": n_cand / loop_time if n_req else None,
        "model_candidates_per_s": sum(r.candidates / r.score_time_s for r in runs if r.score_time_s) or None,
        "cache_enabled": cfg.cache.enabled, "cache_max_bytes": cfg.cache.max_bytes if cfg.cache.enabled else 0,
        "cache_reset_per_partition": cfg.cache.reset_per_partition,
        "cache_hit_rate": stats.get("hit_rate"), "cache": stats,
        "max_len": opened.max_len, "batch_size": cfg.batch_size, "candidate_chunk": cfg.candidate_chunk,
        "stage_time_s": _summed([r.stage_time_s for r in runs]), "mode_counts": _summed([r.counts for r in runs]),
        **mode.info,
        "id_maps": str(opened.inputs.id_maps.path) if opened.inputs.id_maps is not None else None,
        "inputs_eventlog": opened.inputs.eventlog,
        "metrics": mode.metrics(df) if df is not None else {},
        "metrics_note": ("over every partition on disk" + ("" if remaining == 0 else
                                                           f" ({remaining} partitions still missing)")),
        "total_time_s": time.perf_counter() - t_start,
    }
    path = out_dir / "summary.json"
    atomic_write_bytes(path, json.dumps(summary, indent=2, default=json_default).encode())
    return path


__all__ = ["PartitionReader", "load_ranker", "resolve_checkpoint", "run_scoring", "trained_dataset"]
