"""``train_distributed(cfg)``: the ``recsys.train`` job on N torchrun processes.

Per step every rank reads its own batch (``RequestLoader(rank, world_size)``; full batches only,
and every rank runs the same number of steps per epoch: the fewest full batches any rank has,
computed from the Parquet footers). Checkpoints are distributed (DCP) under
``<output_dir>/dist_checkpoints`` and resumed automatically. At the end the tables are gathered
to rank 0, which evaluates the plain model exactly like ``recsys.train`` does, writes
``report.json`` and a model-only ``checkpoints/step_<N>.pt`` that ``recsys.score`` reads.

Run directory: the rules of ``recsys.train``. Every rank checks the overlap with the inputs; rank 0
alone takes the directory's lock (held until every rank is done) and makes the resume decision
(``recsys.train.loop.open_run``: ``train.fresh_run``, ``resume=false`` into a directory with
checkpoints refused, the checkpoint's run configuration checked), and every rank gets its outcome or
its refusal through one broadcast (``recsys.dist.coordination.on_rank0``), so no rank is left waiting.
"""

from __future__ import annotations

import json
import os
import random
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from recsys.data import RequestLoader, prepare_dataset
from recsys.data.config import LoaderConfig
from recsys.data.schema import DataSchema
from recsys.dist.checkpoint import DistCheckpointer
from recsys.dist.config import Backend, DistConfig
from recsys.dist.coordination import on_rank0
from recsys.dist.meta_init import build_meta_model
from recsys.dist.sharding import describe_plan, gather_full_state
from recsys.dist.trainer import DistTrainer
from recsys.model.pyramid import flops_report
from recsys.reliability.atomic import atomic_write_bytes
from recsys.reliability.resume import trim_log
from recsys.reliability.rundir import check_output_dir, lock_run_dir
from recsys.train.checkpoint import CheckpointManager
from recsys.train.config import RunConfig
from recsys.train.evaluate import metrics_report, predict
from recsys.train.loop import (
    DIST_CHECKPOINT_DIR,
    PopularityBaseline,
    build_model,
    config_record,
    max_s_tokens,
    open_run,
    plain_config,
    train_inputs,
)
from recsys.train.schedule import lr_multiplier
from recsys.train.tensorboard import TensorBoardLog
from recsys.reliability.digest import json_default


def init_process_group(dcfg: DistConfig) -> tuple[torch.device, bool]:
    """Joins (or reuses) the torchrun process group; returns (this rank's device, whether we created it)."""
    backend = Backend(dcfg.backend)
    if backend == Backend.none:
        raise ValueError("dist.backend=none: use `python -m recsys.train` (or pass dist=gloo / dist=nccl)")
    if backend == Backend.nccl and not torch.cuda.is_available():
        raise RuntimeError("dist=nccl needs CUDA devices; use dist=gloo on CPU")
    created = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError("dist.backend is set but RANK/WORLD_SIZE are not: launch with "
                               "`torchrun --nproc_per_node N -m recsys.dist dist=gloo ...`")
        dist.init_process_group(backend.value)
        created = True
    if backend == Backend.nccl:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return device, created


def steps_in_epoch(files: list[Path], schema: DataSchema, lcfg: LoaderConfig, world_size: int, epoch: int) -> int:
    """Full batches every rank has in ``epoch`` (the minimum over ranks; from Parquet footers, no I/O)."""
    return min(len(RequestLoader(files, schema, lcfg, rank=r, world_size=world_size, epoch=epoch))
               for r in range(world_size))


def train_distributed(cfg: RunConfig) -> Path:
    """Train on every rank of the process group; rank 0 evaluates and writes ``report.json``.

    Returns the report path (on every rank).
    """
    device, created = init_process_group(cfg.dist)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = [cfg.output_dir]
    dist.broadcast_object_list(out, src=0)  # ${now:...} resolves per process: rank 0's name wins
    cfg = replace(cfg, output_dir=out[0])
    check_output_dir(cfg.output_dir, train_inputs(cfg))  # every rank: a pure check, all refuse alike
    try:
        with ExitStack() as held:  # rank 0 holds the run directory's lock until every rank is done
            resume_from = on_rank0(lambda: _open_run_dir(cfg, held))  # a refusal reaches every rank
            # rank 0 writes the TensorBoard scalars, as it writes train_log.jsonl
            with TensorBoardLog(cfg.output_dir, cfg.train.tensorboard and rank == 0) as board:
                return _train(cfg, device, rank, world, board, resume_from)
    finally:
        if created:
            dist.destroy_process_group()


# What a distributed resume reads from trainer.pt (the sharded model and optimizer are in the DCP files).
DIST_RESUME_KEYS = ("sched", "popularity", "step", "epoch", "batch_in_epoch", "train_time", "samples", "requests",
                    "world_size")


def _open_run_dir(cfg: RunConfig, held: ExitStack) -> str | None:
    """Rank 0: lock ``output_dir`` (released by ``held``), then ``recsys.train``'s resume decision; returns the
    DCP checkpoint to resume from. The model-only ``checkpoints/step_<N>.pt`` count as the directory's
    checkpoints too (``resume=false`` over them is refused), but a resume loads only DCP checkpoints."""
    out_dir = Path(cfg.output_dir)
    held.enter_context(lock_run_dir(out_dir))
    ckpts = DistCheckpointer(out_dir / DIST_CHECKPOINT_DIR, keep=cfg.dist.keep_checkpoints)
    found = open_run(cfg, out_dir, ckpts, DIST_RESUME_KEYS, others=[CheckpointManager(out_dir / "checkpoints")])
    return None if found is None else str(found[0])


def _train(cfg: RunConfig, device: torch.device, rank: int, world: int, board: TensorBoardLog,
           resume_from: str | None) -> Path:
    out_dir = Path(cfg.output_dir)
    tc = cfg.train
    main = rank == 0
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ds = prepare_dataset(cfg.data, progress=tc.progress)
    dist.barrier()  # rank 0 generated / ingested the data; the others now find it cached
    if not main:
        ds = prepare_dataset(cfg.data, progress=False)
    schema = ds.schema
    lcfg = replace(cfg.data.loader, drop_last=True)  # equal batch sizes on every rank
    train_files = ds.splits["train"]
    steps = [steps_in_epoch(train_files, schema, lcfg, world, e) for e in range(tc.epochs)]
    if min(steps) < 1:
        raise ValueError(f"some epoch gives a rank no full batch (batch_size={lcfg.batch_size}, "
                         f"world_size={world}, steps per epoch {steps}): lower data.loader.batch_size")
    total = min(tc.max_steps, sum(steps)) if tc.max_steps else sum(steps)
    dropped = _dropped_rows(train_files, schema, lcfg, world, steps)
    n_train = RequestLoader(train_files, schema, lcfg).num_rows
    if main and dropped > 0.1 * n_train:
        print(f"[dist] warning: up to {dropped} of {n_train} training requests per epoch are skipped: ranks get "
              f"unequal row groups and every rank runs the fewest full batches any rank has; lower "
              f"data.row_group_size (now {cfg.data.row_group_size}) so each rank gets many row groups")
    oc = tc.optim

    torch.manual_seed(tc.seed)  # same seed on every rank: same initial weights everywhere
    random.seed(tc.seed)
    model = build_meta_model(schema, cfg.model, max_s_tokens(schema, cfg.model, cfg.data.loader.max_len))
    trainer = DistTrainer(model, oc, cfg.dist, device, lambda s: lr_multiplier(
        s, oc.warmup_steps, total, oc.lr_decay.value, oc.min_lr_ratio), list(tc.task_weights) or None, tc.bf16)
    if tc.eval_every and main:
        print("[dist] train.eval_every is ignored by distributed runs: validation runs once, on rank 0, at the end")
    plan = describe_plan(trainer.plan)
    popularity = PopularityBaseline(schema.num_items)
    ckpts = DistCheckpointer(out_dir / DIST_CHECKPOINT_DIR, keep=cfg.dist.keep_checkpoints)
    log_path = out_dir / "train_log.jsonl"

    step, epoch, batch_in_epoch, train_time, samples, requests = 0, 0, 0, 0.0, 0, 0
    resumed_from = None
    found = None if resume_from is None else Path(resume_from)  # rank 0's decision (_open_run_dir)
    if found is not None:
        state = trainer.load_checkpoint(found)
        popularity.pos = state["popularity"]
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        train_time, samples, requests = state["train_time"], state["samples"], state["requests"]
        if state["world_size"] != world:
            # Tables and optimizer state were resharded by DCP; the per-rank data position is not
            # transferable (each rank's row groups depend on the world size): restart this epoch.
            if main:
                print(f"[dist] checkpoint written by {state['world_size']} ranks, resuming on {world}: "
                      f"state resharded, epoch {epoch} restarts from its first batch")
            batch_in_epoch = 0
        resumed_from = found
        if main:
            trim_log(log_path, step)  # records a killed run wrote after this checkpoint are replayed
            print(f"[dist] resumed from {found} at step {step}")
    elif main:
        log_path.unlink(missing_ok=True)  # a fresh start (or a run killed before its first checkpoint)
    board.open(step)  # resumed: hides rank 0's events past this checkpoint (purge_step)
    dist.barrier()

    run_record = config_record(cfg)  # the config does not change during the run

    def checkpoint() -> None:
        ckpts.save(step, trainer.sharded_state(), {
            "sched": trainer.sched.state_dict(), "popularity": popularity.pos, "step": step, "epoch": epoch,
            "batch_in_epoch": batch_in_epoch, "train_time": train_time, "samples": samples,
            "requests": requests, "world_size": world, "plan": json.dumps(plan), **run_record,
        })

    def log(record: dict[str, Any]) -> None:
        if main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record, default=json_default) + "\n")
            board.write(record)

    done = bool(tc.max_steps) and step >= tc.max_steps
    bar = tqdm(total=total, initial=step, disable=not (tc.progress and main), desc=f"train x{world}", unit="step",
               dynamic_ncols=True)
    while epoch < tc.epochs and not done:
        loader = RequestLoader(train_files, schema, lcfg, rank=rank, world_size=world, epoch=epoch)
        it = iter(loader)
        for i in range(steps[epoch]):
            batch = next(it)
            if i < batch_in_epoch:  # resume: consumed before the checkpoint
                continue
            t0 = time.perf_counter()
            res = trainer.step(batch)
            train_time += time.perf_counter() - t0
            if epoch == 0:
                popularity.update(batch.cand["item_id"].values(), batch.labels)
            step += 1
            batch_in_epoch = i + 1
            samples += res.candidates  # global (all ranks)
            requests += batch.num_requests * world
            bar.update(1)
            bar.set_postfix(loss=f"{res.loss:.4f}", samples_s=f"{samples / max(train_time, 1e-9):.0f}")
            if step % tc.log_every == 0:
                log({"step": step, "epoch": epoch, "loss": res.loss, "world_size": world,
                     **{f"loss_{t}": v for t, v in zip(schema.tasks, res.per_task)},
                     "samples_per_s": samples / max(train_time, 1e-9)})
            if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                checkpoint()
            if tc.max_steps and step >= tc.max_steps:
                done = True
                break
        else:
            epoch += 1
            batch_in_epoch = 0
    bar.close()
    checkpoint()

    pos = popularity.pos.clone()
    dist.all_reduce(pos)  # every rank counted its own batches
    slowest = torch.tensor([train_time], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    full = gather_full_state(trainer.model, device)
    report_path = out_dir / "report.json"
    if main:
        _evaluate_and_report(cfg, ds, schema, full, pos, {
            "train_samples_per_s": samples / max(float(slowest), 1e-9),
            "train_requests_per_s": requests / max(float(slowest), 1e-9),
            "train_time_s": float(slowest), "steps": step, "train_samples": samples,
            "resumed_from": str(resumed_from) if resumed_from else None,
            "world_size": world, "backend": cfg.dist.backend.value, "sharding": plan,
            "dropped_rows_per_epoch_max": dropped,
        })
    dist.barrier()
    return report_path


def _dropped_rows(files: list[Path], schema: DataSchema, lcfg: LoaderConfig, world: int, steps: list[int]) -> int:
    """Most training requests skipped in an epoch by the equal-full-batches rule."""
    n = RequestLoader(files, schema, lcfg).num_rows
    return max(n - s * world * lcfg.batch_size for s in steps)


def _evaluate_and_report(cfg: RunConfig, ds: Any, schema: DataSchema, full: dict[str, torch.Tensor],
                         popularity_pos: torch.Tensor, train_stats: dict[str, Any]) -> None:
    """Rank 0: plain model from the gathered weights -> same metrics as ``recsys.train``; report + model file."""
    tc, out_dir = cfg.train, Path(cfg.output_dir)
    device = torch.device("cuda") if cfg.dist.backend == Backend.nccl else torch.device("cpu")
    model = build_model(schema, cfg.model, cfg.data.loader.max_len)
    model.load_state_dict(full)
    model.to(device)
    s_max = max_s_tokens(schema, cfg.model, cfg.data.loader.max_len)
    CheckpointManager(out_dir / "checkpoints", keep=tc.keep_checkpoints).save(train_stats["steps"], {
        "model": full, "step": train_stats["steps"], "config": plain_config(cfg), "schema": schema.to_json(),
        "max_s_tokens": s_max, "model_only": True})
    valid = metrics_report(predict(model, RequestLoader(ds.splits["valid"], schema, cfg.data.loader), device,
                                   tc.eval_max_batches, tc.bf16), schema.tasks, "valid_")
    test_pred = predict(model, RequestLoader(ds.splits["test"], schema, cfg.data.loader), device, 0, tc.bf16)
    test = metrics_report(test_pred, schema.tasks, "test_")
    popularity = PopularityBaseline(schema.num_items)
    popularity.pos = popularity_pos
    dense_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("tokenizer.embeddings."))
    report = {
        **test, **valid,
        "oracle_auc": test.get("test_oracle_auc"),
        "popularity_auc": popularity.auc(test_pred.items, test_pred.labels[:, 0]),
        **train_stats,
        "params_dense": dense_params,
        "params_sparse": sum(p.numel() for p in model.tokenizer.embeddings.parameters()),
        "pyramid": model.schedule.describe(),
        "flops_per_request": flops_report(model.schedule, s_max, model.tokenizer.n_ns, 1, cfg.model.d_model,
                                          cfg.model.ffn_mult * cfg.model.d_model),
        "tasks": list(schema.tasks), "data": ds.summary, "device": str(device), "config": plain_config(cfg),
    }
    atomic_write_bytes(out_dir / "report.json", json.dumps(report, indent=2, default=json_default).encode())
