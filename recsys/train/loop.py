"""The training loop behind `python -m recsys.train`: build, train, evaluate, report.

Run directory (``output_dir``): refused when it overlaps the data (``recsys.reliability.rundir``),
locked for the run's lifetime; ``train.resume=false`` into a directory holding checkpoints is refused
(``train.fresh_run=true`` moves the earlier outputs aside), and a resume refuses a checkpoint whose
run configuration (:func:`recsys.train.config.run_identity`) differs from this run's.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torchrec.optim import RowWiseAdagrad
from tqdm import tqdm

from recsys.baselines import Baseline, sparse_parameters
from recsys.baselines import build_model as build_arch
from recsys.data import PreparedDataset, RequestLoader, prepare_dataset
from recsys.data.config import DataSource
from recsys.data.prepare import raw_inputs
from recsys.data.schema import DataSchema
from recsys.errors import InputError
from recsys.model.config import ModelConfig
from recsys.model.heads import multitask_bce
from recsys.model.pyramid import flops_report
from recsys.model.ranker import OneTransRanker
from recsys.quant.ranker import install_sids, with_resolved_sids
from recsys.reliability.atomic import atomic_write_bytes
from recsys.reliability.device import resolve_device
from recsys.reliability.digest import json_default
from recsys.reliability.guards import NonFiniteGuard, grads_finite
from recsys.reliability.resume import trim_log
from recsys.reliability.rng import capture_rng, restore_rng
from recsys.reliability.rundir import check_output_dir, lock_run_dir, move_aside
from recsys.train.checkpoint import CheckpointManager, load_model_state
from recsys.train.config import OptimConfig, RunConfig, identity_differences, run_fingerprint
from recsys.train.evaluate import metrics_report, predict
from recsys.train.metrics import auc
from recsys.train.schedule import lr_multiplier
from recsys.train.tensorboard import TENSORBOARD_DIR, TensorBoardLog


def max_s_tokens(schema: DataSchema, model_cfg: ModelConfig, max_len: int) -> int:
    """Longest S sequence the loader can produce: max_len per kind (+ one SEP per kind if grouped)."""
    k = len(schema.sequences)
    return k * max_len + (k if model_cfg.seq_merge == "intent_grouped" else 0)


def build_model(schema: DataSchema, model_cfg: ModelConfig, max_len: int) -> torch.nn.Module:
    """The model ``model.arch`` names: the OneTrans ranker or a baseline (``recsys.baselines``)."""
    return build_arch(schema, model_cfg, max_s_tokens(schema, model_cfg, max_len))


def make_optimizers(model: torch.nn.Module, cfg: OptimConfig) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """(sparse optimizer over the torchrec tables, dense optimizer over everything else)."""
    sparse_ids = {id(p) for p in sparse_parameters(model)}
    sparse = [p for p in model.parameters() if id(p) in sparse_ids]
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    if cfg.sparse == "rowwise_adagrad":
        opt_sparse: torch.optim.Optimizer = RowWiseAdagrad(sparse, lr=cfg.sparse_lr)
    else:
        opt_sparse = torch.optim.Adagrad(sparse, lr=cfg.sparse_lr)
    if cfg.dense == "adamw":
        opt_dense: torch.optim.Optimizer = torch.optim.AdamW(dense, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)
    else:
        opt_dense = torch.optim.RMSprop(dense, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)
    return opt_sparse, opt_dense


class PopularityBaseline:
    """Scores a candidate by how many positive labels (first task) its item had in training."""

    def __init__(self, num_items: int) -> None:
        self.pos = torch.zeros(num_items, dtype=torch.float64)

    def update(self, items: torch.Tensor, labels: torch.Tensor) -> None:
        self.pos.index_add_(0, items.cpu(), labels[:, 0].double().cpu())

    def auc(self, items: np.ndarray, labels: np.ndarray) -> float:
        return auc(self.pos[torch.as_tensor(items)].numpy(), labels)


def plain_config(cfg: RunConfig) -> dict[str, Any]:
    """The run config as plain JSON types, enums by *value* (what YAML and overrides use)."""
    return json.loads(json.dumps(asdict(cfg)))  # str-valued enums serialise as their values


def config_record(cfg: RunConfig) -> dict[str, Any]:
    """``config`` and its ``config_fingerprint``, as every checkpoint stores them (single-process and
    distributed): what :func:`check_same_run` compares a resume against."""
    config = plain_config(cfg)
    return {"config": config, "config_fingerprint": run_fingerprint(config)}


DIST_CHECKPOINT_DIR = "dist_checkpoints"  # recsys.dist's sharded (DCP) checkpoints
# What a run writes into output_dir (besides the lock file), single-process or distributed: moved aside
# together by train.fresh_run.
RUN_OUTPUTS = ("checkpoints", DIST_CHECKPOINT_DIR, "train_log.jsonl", TENSORBOARD_DIR, "report.json")
# What a resume reads from a checkpoint (a model-only checkpoint, e.g. from recsys.dist, lacks some).
RESUME_KEYS = ("model", "opt_sparse", "opt_dense", "sched", "popularity", "step", "epoch", "batch_in_epoch",
               "train_time", "samples", "requests")


class CheckpointStore(Protocol):
    """A directory of checkpoints (``CheckpointManager``, ``recsys.dist``'s ``DistCheckpointer``)."""

    dir: Path

    def paths(self) -> list[Path]: ...

    def load_latest(self, required: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]] | None: ...


def train_inputs(cfg: RunConfig) -> list[tuple[str, str | None]]:
    """What the run reads, as ``(config key, path)``: ``output_dir`` must overlap none of them."""
    d = cfg.data
    named: list[tuple[str, str | None]] = ([("data.path", d.path)] if d.source == DataSource.parquet
                                           else [("data.root", d.root)])
    named += raw_inputs(d)  # ml-100k raw dir; your own log, its side tables, the dataset whose maps it uses
    named.append(("model.item_embedding.sid_path", cfg.model.item_embedding.sid_path))
    return named


def check_same_run(path: Path, state: dict[str, Any], cfg: RunConfig) -> None:
    """Refuse to resume from a checkpoint of another run configuration, naming every differing key.

    The checkpoint's ``config_fingerprint`` (digest of ``run_identity``) equal to this run's: same run.
    Otherwise (a different digest, or a checkpoint written before fingerprints existed) the stored
    config is compared key by key; keys only one side knows are not compared.
    """
    stored = state.get("config")
    if isinstance(stored, str):  # older recsys.dist checkpoints stored it as JSON text
        try:
            stored = json.loads(stored)
        except json.JSONDecodeError:
            stored = None
    if not isinstance(stored, dict):
        raise InputError(f"checkpoint {path} records no run configuration, so resuming could continue another "
                         "run: use another output_dir, or train.fresh_run=true (moves it aside)")
    current = plain_config(cfg)
    if state.get("config_fingerprint") == run_fingerprint(current):
        return
    diffs = identity_differences(stored, current)
    if diffs:
        raise InputError(
            f"checkpoint {path} is of another run configuration ({len(diffs)} setting(s) differ: "
            f"{'; '.join(diffs[:10])}{' ...' if len(diffs) > 10 else ''}); resuming would continue that run "
            f"under other settings. Rerun with the checkpoint's settings, use another output_dir, or set "
            f"train.fresh_run=true (moves the earlier run into {path.parent.parent}/previous-<time>/)")
    if "config_fingerprint" not in state:
        print(f"[train] {path} has no config fingerprint (older version): its stored config matches key by key")


def _listing(stores: Sequence[CheckpointStore]) -> str:
    """``step_3.pt, step_6.pt in <dir>`` per store holding checkpoints (the newest five of each)."""
    return "; ".join(f"{', '.join(p.name for p in found[-5:])} in {s.dir}" for s in stores if (found := s.paths()))


def open_run(cfg: RunConfig, out_dir: Path, ckpts: CheckpointStore, required: tuple[str, ...] = RESUME_KEYS,
             others: Sequence[CheckpointStore] = ()) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from (checked against this run's config), or None for a fresh start.

    ``ckpts``: the store a resume loads from (``required``: the keys it needs); ``others``: stores whose
    checkpoints count as this directory's too (``recsys.dist``: the model-only ``checkpoints/``).
    ``train.fresh_run``: earlier outputs are moved aside, fresh start. ``train.resume=false`` into a
    directory that holds checkpoints, or a resume where none of them loads: refused (a new run would be
    pruned against, and scored as, the old checkpoints). No checkpoint at all: fresh start. One policy for
    ``recsys.train`` and ``recsys.dist`` (there, rank 0 calls it and every rank gets its outcome).
    """
    tc = cfg.train
    stores = [ckpts, *others]
    if tc.fresh_run:
        moved = move_aside(out_dir, RUN_OUTPUTS)
        if moved is not None:
            print(f"[train] fresh run: the earlier outputs of {out_dir} were moved to {moved}")
        return None
    if not tc.resume:
        if existing := _listing(stores):
            raise InputError(
                f"output_dir={out_dir} already holds checkpoints ({existing}) and train.resume=false: a new "
                "run there would mix with them (retention and recsys.score pick the highest step). Resume "
                "(train.resume=true), start a fresh run there (train.fresh_run=true moves the earlier outputs to "
                "previous-<time>/), or use another output_dir")
        return None
    found = ckpts.load_latest(required=required)
    if found is not None:
        check_same_run(*found, cfg)
    elif existing := _listing(stores):  # every one was reported and skipped: do not start a run over them
        raise InputError(
            f"output_dir={out_dir} holds checkpoints but none can be resumed ({existing}, each reported above); "
            "a new run there would mix with them. Remove or replace them, start a fresh run there "
            "(train.fresh_run=true moves them to previous-<time>/), or use another output_dir")
    return found


def train(cfg: RunConfig) -> Path:
    """Train, evaluate on the test split, write ``report.json``; returns its path."""
    if str(getattr(cfg.dist.backend, "value", cfg.dist.backend)) != "none":  # dist=gloo|nccl under torchrun
        from recsys.dist.loop import train_distributed

        return train_distributed(cfg)
    check_output_dir(cfg.output_dir, train_inputs(cfg))  # before anything is written
    # one process per run directory; the TensorBoard writer refuses a missing package before any work
    with lock_run_dir(cfg.output_dir), TensorBoardLog(cfg.output_dir, cfg.train.tensorboard) as board:
        return _train(cfg, Path(cfg.output_dir), board)


def _train(cfg: RunConfig, out_dir: Path, board: TensorBoardLog) -> Path:
    tc = cfg.train
    cfg, sids = with_resolved_sids(cfg)  # item_embedding=sid/both: SID sizes + codes from its sid_path
    ckpts = CheckpointManager(out_dir / "checkpoints", keep=tc.keep_checkpoints)
    found = open_run(cfg, out_dir, ckpts)  # refusals before the data is prepared
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)  # all three are saved in checkpoints and restored on resume (recsys.reliability.rng)
    device = resolve_device(tc.device, "train.device")
    # all three splits: it trains on train, validates on valid, reports on test: an empty one is refused before any step
    ds: PreparedDataset = prepare_dataset(cfg.data, progress=tc.progress, need=("train", "valid", "test"))
    schema = ds.schema
    model = build_model(schema, cfg.model, cfg.data.loader.max_len).to(device)
    if sids is not None:
        install_sids(model, sids, schema.num_items)
    opt_sparse, opt_dense = make_optimizers(model, tc.optim)
    dense_params = [p for g in opt_dense.param_groups for p in g["params"]]
    steps_per_epoch = len(RequestLoader(ds.splits["train"], schema, cfg.data.loader))  # from Parquet footers
    total = min(tc.max_steps, tc.epochs * steps_per_epoch) if tc.max_steps else tc.epochs * steps_per_epoch
    oc = tc.optim
    sched = torch.optim.lr_scheduler.LambdaLR(opt_dense, lambda s: lr_multiplier(
        s, oc.warmup_steps, total, oc.lr_decay.value, oc.min_lr_ratio))
    weights = list(tc.task_weights) or None
    popularity = PopularityBaseline(schema.num_items)
    log_path = out_dir / "train_log.jsonl"
    guard = NonFiniteGuard(tc.max_consecutive_nonfinite)
    all_params = [p for opt in (opt_sparse, opt_dense) for g in opt.param_groups for p in g["params"]]
    last_saved = -1

    step, epoch, batch_in_epoch, train_time, samples, requests = 0, 0, 0, 0.0, 0, 0
    resumed_from = None
    if found is not None:
        resumed_from, state = found
        load_model_state(model, state["model"], str(resumed_from))
        opt_sparse.load_state_dict(state["opt_sparse"])
        opt_dense.load_state_dict(state["opt_dense"])
        sched.load_state_dict(state["sched"])
        popularity.pos = state["popularity"]
        restore_rng(state["rng"] if "rng" in state else {"torch": state["torch_rng"]})
        guard.load_state_dict(state.get("nonfinite", {}))
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        train_time, samples, requests = state["train_time"], state["samples"], state["requests"]
        last_saved = step
        trim_log(log_path, step)  # records a killed run wrote after this checkpoint are replayed
        print(f"[train] resumed from {resumed_from} at step {step}")
    else:
        log_path.unlink(missing_ok=True)  # a fresh start (or a run killed before its first checkpoint)
    board.open(step)  # resumed: hides the killed run's events past this checkpoint (purge_step)

    run_record = config_record(cfg)  # the config does not change during the run

    def checkpoint() -> None:
        nonlocal last_saved
        last_saved = step
        ckpts.save(step, {
            "model": model.state_dict(), "opt_sparse": opt_sparse.state_dict(), "opt_dense": opt_dense.state_dict(),
            "sched": sched.state_dict(), "popularity": popularity.pos, "rng": capture_rng(),
            "nonfinite": guard.state_dict(),
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "train_time": train_time,
            "samples": samples, "requests": requests,
            **run_record,
            "schema": schema.to_json(), "max_s_tokens": max_s_tokens(schema, cfg.model, cfg.data.loader.max_len),
            "dataset_dir": str(ds.path.resolve()),  # recsys.score opens it as is (no log hashed or re-read)
            **({"item_sid": sids.to_dict()} if sids is not None else {}),  # item -> SID + quantizer (scoring)
        })

    def log(record: dict[str, Any]) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(record, default=json_default) + "\n")
        board.write(record)

    def validate() -> dict[str, Any]:
        loader = RequestLoader(ds.splits["valid"], schema, cfg.data.loader)
        pred = predict(model, loader, device, tc.eval_max_batches, tc.bf16)
        return metrics_report(pred, schema.tasks, "valid_")

    done = bool(tc.max_steps) and step >= tc.max_steps
    bar = tqdm(total=total, initial=step, disable=not tc.progress, desc="train", unit="step", dynamic_ncols=True)
    while epoch < tc.epochs and not done:
        loader = RequestLoader(ds.splits["train"], schema, cfg.data.loader, epoch=epoch)
        for i, batch in enumerate(loader):
            if i < batch_in_epoch:  # resume: these batches were consumed before the checkpoint
                continue
            t0 = time.perf_counter()  # train_time: model step only (reading/collating is timed by bench/data_throughput.py)
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.bf16):
                logits = model(batch)
            loss, per_task = multitask_bce(logits, batch.labels, weights)
            if isinstance(model, Baseline) and (aux := model.auxiliary_loss()) is not None:
                loss = loss + aux  # e.g. SASRec's next-item softmax; per_task stays the task BCE
            opt_sparse.zero_grad(set_to_none=True)
            opt_dense.zero_grad(set_to_none=True)
            bad = None if math.isfinite(loss.item()) else "loss"  # NaN/Inf loss: no backward at all
            if bad is None:
                loss.backward()
                if not grads_finite(all_params):  # dense and embedding-table gradients
                    bad = "grad"
            if bad is not None:  # skip: no optimizer / scheduler step, batch consumed (recsys.reliability.guards)
                opt_sparse.zero_grad(set_to_none=True)
                opt_dense.zero_grad(set_to_none=True)
                batch_in_epoch = i + 1
                train_time += time.perf_counter() - t0
                log({"step": step + 1, "epoch": epoch, "batch": i, "skipped": f"nonfinite_{bad}"})
                guard.skip(bad, step=step + 1, epoch=epoch, batch=i, value=loss.item())
                continue
            guard.ok()
            if tc.optim.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(dense_params, tc.optim.clip_grad_norm)
            opt_sparse.step()
            opt_dense.step()
            lr = sched.get_last_lr()[0]  # the dense lr this step used (the sparse lr is constant)
            sched.step()
            train_time += time.perf_counter() - t0
            if epoch == 0:
                popularity.update(batch.cand["item_id"].values(), batch.labels)
            step += 1
            batch_in_epoch = i + 1
            samples += batch.num_candidates
            requests += batch.num_requests
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{samples / max(train_time, 1e-9):.0f}")
            if step % tc.log_every == 0:
                log({"step": step, "epoch": epoch, "loss": loss.item(),
                     **{f"loss_{t}": float(v) for t, v in zip(schema.tasks, per_task)},
                     "lr": lr, "samples_per_s": samples / max(train_time, 1e-9)})
            if tc.eval_every and step % tc.eval_every == 0:
                log({"step": step, "epoch": epoch, **validate()})
            if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                checkpoint()
            if tc.max_steps and step >= tc.max_steps:
                done = True
                break
        else:
            epoch += 1
            batch_in_epoch = 0
    bar.close()
    if last_saved != step:  # not twice at one step: a re-save would race the sidecar digest of the first
        checkpoint()

    valid = validate()
    test_pred = predict(model, RequestLoader(ds.splits["test"], schema, cfg.data.loader), device, 0, tc.bf16)
    test = metrics_report(test_pred, schema.tasks, "test_")
    report: dict[str, Any] = {
        **test,
        **valid,
        "oracle_auc": test.get("test_oracle_auc"),  # None unless the data carries planted probabilities
        "popularity_auc": popularity.auc(test_pred.items, test_pred.labels[:, 0]),
        "train_samples_per_s": samples / max(train_time, 1e-9),
        "train_requests_per_s": requests / max(train_time, 1e-9),
        "train_time_s": train_time, "steps": step, "train_samples": samples,
        "resumed_from": str(resumed_from) if resumed_from else None,
        **guard.report(),
        "params_dense": sum(p.numel() for p in dense_params),
        "params_sparse": sum(p.numel() for g in opt_sparse.param_groups for p in g["params"]),
        "pyramid": model.schedule.describe() if isinstance(model, OneTransRanker) else None,
        "flops_per_request": flops_report(
            model.schedule, max_s_tokens(schema, cfg.model, cfg.data.loader.max_len), model.tokenizer.n_ns,
            1, cfg.model.d_model, cfg.model.ffn_mult * cfg.model.d_model) if isinstance(model, OneTransRanker) else None,
        "tasks": list(schema.tasks), "data": ds.summary, "device": str(device),
        "config": plain_config(cfg),
    }
    report_path = out_dir / "report.json"
    atomic_write_bytes(report_path, json.dumps(report, indent=2, default=json_default).encode())
    return report_path
