"""The training loop behind ``python -m recsys.train`` and ``torchrun --nproc_per_node N -m recsys.train``.

One loop for one process and for N ranks: what differs (sharding, fused sparse optimizer, collectives,
checkpoint format) is the strategy of ``recsys.dist.strategy`` (``dist=none`` -> ``SingleProcess``,
``dist=gloo|nccl`` -> ``Distributed``); the step is :class:`recsys.train.step.Trainer`. Build, train,
checkpoint, resume, evaluate and ``report.json`` are the same code in both.

Run directory: ``recsys.train.rundir`` (overlap with the inputs refused on every rank; lock and resume
decision taken once, by rank 0 under N ranks, and its outcome or refusal reaches every rank).

Data under N ranks: every rank reads its own batch (``RequestLoader(rank, world_size)``, full batches
only) and every rank runs the same number of steps per epoch: the fewest full batches any rank has,
computed from the Parquet footers. One process reads every batch (the last one may be short).
Under N ranks the batches go through torchrec's ``TrainPipelineSparseDist`` by default (``dist.pipeline``,
``recsys.dist.pipeline``: batch i+1's input all-to-all during step i); the step itself is unchanged.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from recsys.baselines.factory import max_s_tokens
from recsys.data import PreparedDataset, RequestLoader, prepare_dataset
from recsys.data.batch import RequestBatch
from recsys.data.config import LoaderConfig
from recsys.data.schema import DataSchema
from recsys.dist.config import Pipeline
from recsys.dist.pipeline import Eager, SparseDistPipeline, resolve_pipeline
from recsys.dist.schedule import lr_multiplier
from recsys.dist.strategy import SingleProcess, make_strategy
from recsys.errors import InputError
from recsys.model.config import ItemEmbeddingMode
from recsys.quant.ranker import install_sids, with_resolved_sids
from recsys.reliability.digest import json_default
from recsys.reliability.faults import fault_point
from recsys.reliability.guards import NonFiniteGuard
from recsys.reliability.resume import trim_log
from recsys.reliability.rng import capture_rng, restore_rng
from recsys.reliability.rundir import check_output_dir
from recsys.retrieval.train_hooks import build_trainable
from recsys.runtime.allocator import keep_freed_memory
from recsys.train.config import RankingLoss, RunConfig
from recsys.train.early_stopping import BestWeights, EarlyStopper
from recsys.train.evaluate import metrics_report, predict
from recsys.train.hard_negatives import HardNegatives
from recsys.train.report import write_report
from recsys.train.rundir import claim_run_dir, config_record, open_run, train_inputs
from recsys.train.state import Progress
from recsys.train.step import StepResult, Trainer
from recsys.train.tensorboard import TensorBoardLog

__all__ = ["open_run", "train", "train_inputs"]


def train(cfg: RunConfig) -> Path:
    """Train (one process, or this rank of N under torchrun), evaluate on the test split, write ``report.json``.

    Returns the report path (on every rank; rank 0 writes it).
    """
    keep_freed_memory()  # every step reuses the last one's activation memory instead of faulting it in again
    par = make_strategy(cfg.dist, cfg.model, cfg.train.device)  # a model N ranks cannot shard: refused
    try:
        out = par.gather_objects(cfg.output_dir)[0]  # ${now:...} resolves per process: rank 0's name wins
        cfg, sids = with_resolved_sids(replace(cfg, output_dir=out))  # item_embedding=sid/both: sizes + codes
        check_output_dir(cfg.output_dir, train_inputs(cfg))  # every rank: a pure check, all refuse alike
        # the TensorBoard writer (rank 0) refuses a missing package before any work
        with ExitStack() as held, TensorBoardLog(Path(cfg.output_dir), cfg.train.tensorboard and par.main) as board:
            found = par.decide(lambda: claim_run_dir(cfg, par, held))  # rank 0 locks until every rank is done
            return Run(cfg, par, board, sids).train(found)
    finally:
        par.close()


def steps_in_epoch(files: list[Path], schema: DataSchema, lcfg: LoaderConfig, world_size: int, epoch: int) -> int:
    """Batches every rank has in ``epoch`` (the minimum over ranks; from Parquet footers, no I/O)."""
    return min(len(RequestLoader(files, schema, lcfg, rank=r, world_size=world_size, epoch=epoch))
               for r in range(world_size))


def make_driver(cfg: RunConfig, par: SingleProcess, trainer: Trainer) -> Eager | SparseDistPipeline:
    """How the epochs feed the trainer (``dist.pipeline``, ``recsys.dist.pipeline``): torchrec's
    ``TrainPipelineSparseDist`` around the trainer's two halves, or the whole step batch by batch."""
    mode = resolve_pipeline(cfg.dist.pipeline, par.world, cfg.model.item_embedding.hash_buckets)
    if par.main and par.world > 1:
        print(f"[train] dist.pipeline={mode.value}")
    if mode == Pipeline.sparse_dist:
        return SparseDistPipeline(trainer.model, trainer.opt.dense, par.device, trainer.forward, trainer.update)
    return Eager(trainer.step)


def seed_everything(seed: int) -> None:
    """torch, Python and NumPy (all three saved in checkpoints and restored on resume: recsys.reliability.rng).
    Same seed on every rank: same initial weights everywhere."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class Run:
    """One run of the loop on this process (see the module docstring)."""

    def __init__(self, cfg: RunConfig, par: SingleProcess, board: TensorBoardLog, sids: Any) -> None:
        self.cfg, self.par, self.board, self.sids = cfg, par, board, sids
        self.tc, self.out_dir = cfg.train, Path(cfg.output_dir)
        self.log_path = self.out_dir / "train_log.jsonl"

    def prepare(self) -> PreparedDataset:
        """Rank 0 generates / ingests the data first; the other ranks then find it cached."""
        need = ("train", "valid", "test")  # trains on train, validates on valid, reports on test
        ds = prepare_dataset(self.cfg.data, progress=self.tc.progress, need=need) if self.par.main else None
        self.par.barrier()
        return ds if ds is not None else prepare_dataset(self.cfg.data, progress=False, need=need)

    def build(self) -> torch.nn.Module:
        model = build_trainable(self.schema, self.cfg.model, self.s_max, self.sids)
        if self.sids is not None and self.cfg.model.item_embedding.mode != ItemEmbeddingMode.id:
            install_sids(model, self.sids, self.schema.num_items)
        return model

    def setup(self) -> None:
        cfg, tc, par = self.cfg, self.tc, self.par
        if tc.early_stopping.metric is not None and tc.early_stopping.restore_best and par.world > 1:
            raise InputError("train.early_stopping.restore_best is one process only (the weights are sharded over "
                             "the ranks); set it to false under torchrun")
        self.ds = self.prepare()
        self.schema = self.ds.schema
        self.s_max = max_s_tokens(self.schema, cfg.model, cfg.data.loader.max_len)
        # N ranks: full batches only, so every rank passes the same number of requests to the sharded tables
        self.lcfg = cfg.data.loader if par.world == 1 else replace(cfg.data.loader, drop_last=True)
        files = self.ds.splits["train"]
        self.steps = [steps_in_epoch(files, self.schema, self.lcfg, par.world, e) for e in range(tc.epochs)]
        if min(self.steps) < 1:
            raise ValueError(f"some epoch gives a rank no full batch (batch_size={self.lcfg.batch_size}, "
                             f"world_size={par.world}, steps per epoch {self.steps}): lower data.loader.batch_size")
        self.total = min(tc.max_steps, sum(self.steps)) if tc.max_steps else sum(self.steps)
        n_rows = RequestLoader(files, self.schema, self.lcfg).num_rows
        self.dropped = max(0, max(n_rows - s * par.world * self.lcfg.batch_size for s in self.steps))
        if par.world > 1 and self.dropped > 0.1 * n_rows and par.main:
            print(f"[train] warning: up to {self.dropped} of {n_rows} training requests per epoch are skipped: ranks "
                  f"get unequal row groups and every rank runs the fewest full batches any rank has; lower "
                  f"data.row_group_size (now {cfg.data.row_group_size}) so each rank gets many row groups")
        seed_everything(tc.seed)
        oc = tc.optim
        module, opt = par.wrap(par.instantiate(self.build), oc, lambda s: lr_multiplier(
            s, oc.warmup_steps, self.total, oc.lr_decay.value, oc.min_lr_ratio))
        self.trainer = Trainer(module, par, opt, list(tc.task_weights) or None, tc.bf16, oc.clip_grad_norm,
                               listwise=tc.loss == RankingLoss.listwise)
        self.driver = make_driver(cfg, par, self.trainer)
        self.store = par.store(self.out_dir, tc.keep_checkpoints)
        self.progress = Progress()
        self.positives = torch.zeros(self.schema.num_items, dtype=torch.float64)  # count-based popularity
        self.guard = NonFiniteGuard(tc.max_consecutive_nonfinite)
        self.stopper = EarlyStopper(tc.early_stopping)
        self.best_weights = BestWeights(self.out_dir)
        self.hard = (HardNegatives(tc.hard_negatives, self.schema, files, self.ds.path.resolve(), tc.seed, par.rank)
                     if tc.hard_negatives.retriever is not None else None)
        self.record = {**config_record(cfg), **self.scoring_record()}  # the config does not change during the run

    def scoring_record(self) -> dict[str, Any]:
        """What ``recsys.score`` / ``recsys.evaluate`` read from a checkpoint beside the model."""
        return {"schema": self.schema.to_json(), "max_s_tokens": self.s_max,
                "dataset_dir": str(self.ds.path.resolve()),  # recsys.score opens it as is (no log hashed or re-read)
                **({"item_sid": self.sids.to_dict()} if self.sids is not None else {}),  # item -> SID + quantizer
                **({"score_prior": self.hard.record()} if self.prior else {})}  # the retriever a server adds

    @property
    def prior(self) -> bool:
        """The ranker is a residual over its hard-negative retriever's score (``train.hard_negatives.prior``)."""
        return self.hard is not None and self.tc.hard_negatives.prior

    def eval_batches(self, split: str) -> Iterable[RequestBatch]:
        """The batches of ``split`` as validation / test reads them (with the retriever's prior when trained so)."""
        loader = RequestLoader(self.ds.splits[split], self.schema, self.cfg.data.loader,
                               time_gap_buckets=self.cfg.model.time_gap_buckets)
        return (self.hard.with_prior(b) for b in loader) if self.prior else loader

    def resume(self, found: tuple[str, dict[str, Any]] | None) -> Path | None:
        """Load the checkpoint rank 0 chose (every rank; collective under N ranks), or start fresh."""
        par = self.par
        if found is None:
            if par.main:
                self.log_path.unlink(missing_ok=True)  # a fresh start (or a run killed before its first checkpoint)
            return None
        path, state = Path(found[0]), found[1]
        par.load(path, state, self.trainer.model, self.trainer.opt)
        self.progress.load(state)
        self.positives = state["popularity"].clone() if par.main else torch.zeros_like(state["popularity"])
        ranks = state.get("rng_ranks")
        restore_rng(ranks[par.rank] if ranks and len(ranks) == par.world
                    else state["rng"] if "rng" in state else {"torch": state["torch_rng"]})
        self.guard.load_state_dict(state.get("nonfinite", {}))
        self.stopper.load_state_dict(state.get("early_stopping", {}))
        saved_world = state.get("world_size", 1)
        if saved_world != par.world:
            # Tables and optimizer state were resharded by DCP; the per-rank data position is not
            # transferable (each rank's row groups depend on the world size): restart this epoch.
            if par.main:
                print(f"[train] checkpoint written by {saved_world} rank(s), resuming on {par.world}: "
                      f"state resharded, epoch {self.progress.epoch} restarts from its first batch")
            self.progress.batch_in_epoch = 0
        if par.main:
            trim_log(self.log_path, self.progress.step)  # records a killed run wrote after this checkpoint
            print(f"[train] resumed from {path} at step {self.progress.step}")
        return path

    def checkpoint(self) -> None:
        """Collective: the strategy's format, with the trainer's state (counters, global popularity counts,
        every rank's RNG, guard) and the run's config and scoring record."""
        par, p = self.par, self.progress
        positives = par.sum_(self.positives.clone())  # every rank counted its own batches
        rngs = par.gather_objects(capture_rng())
        state = {"popularity": positives, "rng": rngs[0], **({"rng_ranks": rngs} if par.world > 1 else {}),
                 "nonfinite": self.guard.state_dict(), "early_stopping": self.stopper.state_dict(),
                 **p.state_dict(), **self.record}
        par.save(self.store, p.step, self.trainer.model, self.trainer.opt, state)
        self.last_saved = p.step

    def log(self, record: dict[str, Any]) -> None:
        if self.par.main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record, default=json_default) + "\n")
            self.board.write(record)

    def plain_model(self) -> torch.nn.Module | None:
        """Collective under N ranks: the trained model, unsharded, on rank 0 (None on the others)."""
        return self.par.plain_model(self.trainer.model, self.build)

    def validate(self, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """Validation metrics (rank 0; ``{}`` on the other ranks). Collective under N ranks unless ``model``."""
        model = model if model is not None else self.plain_model()
        if model is None:
            return {}
        pred = predict(model, self.eval_batches("valid"), self.par.device, self.tc.eval_max_batches, self.tc.bf16)
        loader = RequestLoader(self.ds.splits["valid"], self.schema, self.cfg.data.loader,
                               time_gap_buckets=self.cfg.model.time_gap_buckets)
        out = metrics_report(pred, self.schema.tasks, "valid_")
        if (own := getattr(model, "validation_metrics", None)) is not None:  # retrievers, SASRec: next-item recall@K
            out.update(own(loader, self.par.device, self.tc.eval_max_batches))
        return out

    def after_step(self, res: StepResult, epoch: int, i: int, t0: float) -> None:
        """Counters, log, validation and checkpoint of one applied or skipped step."""
        p, tc = self.progress, self.tc
        p.train_time += time.perf_counter() - t0
        p.batch_in_epoch = i + 1
        if res.skipped is not None:  # no update; batch consumed (recsys.reliability.guards)
            self.log({"step": p.step + 1, "epoch": epoch, "batch": i, "skipped": f"nonfinite_{res.skipped}"})
            self.guard.skip(res.skipped, step=p.step + 1, epoch=epoch, batch=i, value=res.loss)
            return
        self.guard.ok()
        p.step += 1
        p.samples += res.candidates
        p.requests += res.requests
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{res.loss:.4f}", samples_s=f"{p.samples / max(p.train_time, 1e-9):.0f}")
        if p.step % tc.log_every == 0:
            self.log({"step": p.step, "epoch": epoch, "loss": res.loss, "world_size": self.par.world,
                      **{f"loss_{t}": float(v) for t, v in zip(self.schema.tasks, res.per_task)},
                      "lr": res.lr, "samples_per_s": p.samples / max(p.train_time, 1e-9)})
        if tc.eval_every and p.step % tc.eval_every == 0:
            valid = self.validate()
            if valid:
                self.log({"step": p.step, "epoch": epoch, **valid})
            if self.stopper.enabled:
                self.early_stopping(valid)
        if tc.checkpoint_every and p.step % tc.checkpoint_every == 0:
            self.checkpoint()

    def early_stopping(self, valid: dict[str, Any]) -> None:
        """Rank 0 has the metrics: it decides, every rank gets the counters; a new best's weights are kept
        (:meth:`restore_best` puts them back after the last step)."""
        es, step = self.tc.early_stopping, self.progress.step
        self.stopper.load_state_dict(self.par.decide(lambda: self.stopper.observe(valid, step)))
        if es.restore_best and self.stopper.best_step == step:
            self.best_weights.save(self.trainer.model, step)
        if self.stopper.stopped and self.par.main:
            print(f"[train] early stopping at step {step}: {es.metric} best {self.stopper.best:.6g} at step "
                  f"{self.stopper.best_step}, no improvement in {es.patience} validations")

    def restore_best(self) -> bool:
        """After the last step: the best validation's weights back into the model (one process; see
        ``recsys.train.early_stopping``); True when they were (the final checkpoint must then be written)."""
        step = self.progress.step
        if not self.stopper.should_restore(step):
            return False
        self.best_weights.restore(self.trainer.model, self.stopper.best_step)
        self.stopper.restored = True
        print(f"[train] best weights restored: step {self.stopper.best_step} ({self.tc.early_stopping.metric} "
              f"{self.stopper.best:.6g}), trained to step {step}")
        return True

    def epochs(self) -> None:
        """Train until ``train.epochs`` or ``train.max_steps``; the data iterator is this loop's, the step the trainer's."""
        p, tc = self.progress, self.tc
        done = bool(tc.max_steps) and p.step >= tc.max_steps or self.stopper.stopped
        while p.epoch < tc.epochs and not done:
            loader = RequestLoader(self.ds.splits["train"], self.schema, self.lcfg, rank=self.par.rank,
                                   world_size=self.par.world, epoch=p.epoch,
                                   time_gap_buckets=self.cfg.model.time_gap_buckets)
            # resume: the batches consumed before the checkpoint are skipped; every rank runs steps[epoch] batches
            batches = islice(loader, p.batch_in_epoch, self.steps[p.epoch])
            if self.hard is not None:  # seeded by the batch's index in the epoch: a resumed run draws the same
                batches = self.hard.stream(batches, p.epoch, p.batch_in_epoch)
            for i in range(p.batch_in_epoch, self.steps[p.epoch]):
                # train_time from t0: eager, the model step only (reading/collating: bench/data_throughput.py);
                # pipelined, the step with the next batches' reading and input dist it overlaps
                res, batch, t0 = self.driver.step(batches)
                if res.skipped is None and p.epoch == 0:
                    self.positives.index_add_(0, batch.cand["item_id"].values().cpu(), batch.labels[:, 0].double().cpu())
                self.after_step(res, p.epoch, i, t0)
                fault_point("train.after_step")
                if tc.max_steps and p.step >= tc.max_steps or self.stopper.stopped:
                    done = True
                    break
            else:
                p.epoch += 1
                p.batch_in_epoch = 0

    def train(self, found: tuple[str, dict[str, Any]] | None) -> Path:
        self.setup()
        resumed_from = self.resume(found)
        self.last_saved = self.progress.step if resumed_from is not None else -1
        self.board.open(self.progress.step)  # resumed: hides the killed run's events past this checkpoint
        self.par.barrier()
        self.bar = tqdm(total=self.total, initial=self.progress.step, disable=not (self.tc.progress and self.par.main),
                        desc="train" if self.par.world == 1 else f"train x{self.par.world}", unit="step",
                        dynamic_ncols=True)
        self.epochs()
        self.driver.close()
        self.bar.close()
        restored = self.restore_best()
        # not twice at one step unless the weights changed: a re-save rewrites the step's file and its digest
        if self.last_saved != self.progress.step or restored:
            self.checkpoint()
        model = self.plain_model()
        self.par.export(self.out_dir, self.tc.keep_checkpoints, self.progress.step, model, self.record)
        positives = self.par.sum_(self.positives.clone())
        train_time = float(self.par.max_(torch.tensor([self.progress.train_time], dtype=torch.float64)))
        report_path = self.out_dir / "report.json"
        if model is not None and hasattr(model, "write_artifact"):  # a retriever: <run dir>/retriever
            model.write_artifact(self.out_dir, self.schema, self.record["dataset_dir"])
        if model is not None:
            write_report(report_path, self, model, positives, train_time, resumed_from)
        self.par.barrier()
        return report_path
