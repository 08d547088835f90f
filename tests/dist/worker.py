"""Scenarios run by tests/dist/test_dist.py under ``torchrun --nproc_per_node W`` (gloo, CPU).

    torchrun ... tests/dist/worker.py match <sharding>[,<sharding>...] <steps> <out_dir> [sid|listwise]
        (sid: the semantic-ID model of dist_scenario.build_sid; listwise: train.loss=listwise on batches
        with a residual ranker's prior, dist_scenario.global_batch_with_prior)
    torchrun ... tests/dist/worker.py nonfinite <out_dir>
        (a NaN loss on one rank: the step is skipped on both, no weight, table or optimizer state moves;
        then a finite loss with Inf gradients on one rank: both stop before the dense step;
        <out_dir>/nonfinite-rank<r>.pt holds each rank's findings)
    torchrun ... tests/dist/worker.py resume <sharding> <out_dir> <data_root> <k> <n>
        (2 ranks: uninterrupted and crashed+resumed runs, then a resume of "crashed" under another
        configuration, which every rank must refuse: <out_dir>/refused-rank<r>.txt holds each rank's
        message; 1 rank: resume the 2-rank checkpoint in reshard1/)
    torchrun ... tests/dist/worker.py meta <sharding>[,<sharding>...] <steps> <out_dir>
        (tables built on meta vs the full plain model, on dist_scenario.META_SCHEMA)

Not collected by pytest (no ``test_`` prefix); results are written under ``out_dir`` and the
test process compares them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import RequestBatch
from recsys.dist.config import DistConfig
from recsys.dist.sharding import gather_full_state
from recsys.dist.strategy import Distributed
from recsys.dist.wrap import sharded_state
from recsys.errors import InputError
from recsys.model.ranker import OneTransRanker
from recsys.reliability.faults import ENV
from recsys.train.config import RunConfig, register_configs
from recsys.train.loop import train
from recsys.train.step import NonFiniteTableUpdate, Trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_scenario as scenario  # noqa: E402  (shared with the test process: model, optimizer config, global batches)


def _take_kjt(kjt: KeyedJaggedTensor, lo: int, hi: int) -> KeyedJaggedTensor:
    """Requests ``lo:hi`` of a KJT whose every key has one length per request."""
    keys, values, lengths = [], [], []
    for k, jt in kjt.to_dict().items():
        off = jt.offsets()
        keys.append(k)
        values.append(jt.values()[off[lo]:off[hi]])
        lengths.append(jt.lengths()[lo:hi])
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))


def take_requests(b: RequestBatch, lo: int, hi: int) -> RequestBatch:
    """Requests ``lo:hi`` of a batch (this rank's part of a global batch)."""
    c0, c1 = int(b.cand_offsets[lo]), int(b.cand_offsets[hi])
    return RequestBatch(
        request_id=b.request_id[lo:hi], user_id=b.user_id[lo:hi], request_ts=b.request_ts[lo:hi],
        sparse=_take_kjt(b.sparse, lo, hi), dense=b.dense[lo:hi], seq=_take_kjt(b.seq, lo, hi),
        seq_ts=_take_kjt(b.seq_ts, lo, hi), cand=_take_kjt(b.cand, lo, hi),
        cand_offsets=b.cand_offsets[lo:hi + 1] - c0, labels=b.labels[c0:c1],
        true_prob=None if b.true_prob is None else b.true_prob[c0:c1],
        prior=None if b.prior is None else b.prior[c0:c1])


def match(shardings: str, steps: int, out: Path, model: str = "id") -> None:
    """For each comma-separated sharding type: train on this rank's half of each global batch;
    rank 0 writes losses + gathered weights to ``<name>_<sharding>.pt`` (name ``dist``, or ``model``)."""
    build = scenario.build_sid if model == "sid" else scenario.build
    for sharding in shardings.split(","):
        match_one(sharding, steps, out, build, "dist" if model == "id" else model)


def sharded_trainer(sharding: str, model: OneTransRanker | None = None,
                    build: Callable[[], OneTransRanker] = scenario.build, listwise: bool = False
                    ) -> tuple[Distributed, Trainer]:
    """The production pieces: the Distributed strategy wraps ``model`` (default: ``build``'s model, its
    tables on meta as the trainer builds it), the one step function."""
    par = Distributed(DistConfig(backend="gloo", sharding=sharding))
    oc = scenario.optim_config()
    if model is None:
        model = par.instantiate(build)
    module, opt = par.wrap(model, oc, scenario.lr_lambda)
    return par, Trainer(module, par, opt, clip_grad_norm=oc.clip_grad_norm, listwise=listwise)


def my_part(g: RequestBatch) -> RequestBatch:
    rank, world = dist.get_rank(), dist.get_world_size()
    per = g.num_requests // world
    return take_requests(g, rank * per, (rank + 1) * per)


def match_one(sharding: str, steps: int, out: Path, build: Callable[[], OneTransRanker], name: str) -> None:
    listwise = name == "listwise"
    batch = scenario.global_batch_with_prior if listwise else scenario.global_batch
    par, trainer = sharded_trainer(sharding, build=build, listwise=listwise)
    losses = [trainer.step(my_part(batch(t))).loss for t in range(steps)]
    full = gather_full_state(trainer.model)
    if par.rank == 0:
        torch.save({"losses": losses, "state": full, "plan": par.plan}, out / f"{name}_{sharding}.pt")


def local_snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    """This rank's copy of every weight and optimizer state tensor (table shards, fused accumulators, dense)."""
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, v: object) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}", x)
        elif hasattr(v, "local_shards"):
            for i, shard in enumerate(v.local_shards()):
                flat[f"{prefix}#{i}"] = shard.tensor.detach().clone()
        elif isinstance(v, torch.Tensor):
            flat[prefix] = v.detach().clone()
    walk("", sharded_state(trainer.model, trainer.opt.dense))
    return flat


def nonfinite(out: Path) -> None:
    par, trainer = sharded_trainer("row_wise")
    trainer.step(my_part(scenario.global_batch(0)))  # optimizer state exists from here on
    before, last_epoch = local_snapshot(trainer), trainer.opt.sched.last_epoch
    bad = my_part(scenario.global_batch(1))
    if par.rank == 1:  # one rank's labels are NaN: its loss, hence the global loss, is NaN
        bad.labels[0, 0] = float("nan")
    skipped = trainer.step(bad).skipped
    after = local_snapshot(trainer)
    found = {"skipped": skipped, "keys": len(before), "tables": sum("embeddings" in k for k in before),
             "unchanged": sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before),
             "sched_unchanged": trainer.opt.sched.last_epoch == last_epoch}
    dense_before = [p.detach().clone() for p in trainer.opt.dense_params]
    if par.rank == 1:  # a finite loss whose gradients are Inf on one rank only
        os.environ[ENV] = "train.nonfinite_grad@1"
    try:
        trainer.step(my_part(scenario.global_batch(2)))
        found["grad_error"] = "not raised"
    except NonFiniteTableUpdate as e:
        found["grad_error"] = str(e)
    os.environ.pop(ENV, None)
    found["dense_unchanged"] = all(torch.equal(a, p) for a, p in zip(dense_before, trainer.opt.dense_params))
    torch.save(found, out / f"nonfinite-rank{par.rank}.pt")


def meta(shardings: str, steps: int, out: Path) -> None:
    """For each sharding, twice (tables built on meta, then the full plain model): every rank writes its
    initial local shards (``<path>_<sharding>_init_rank<r>.pt``: ``{key: [(offsets, tensor)]}``, the
    replicated tensors under offsets ``None``); rank 0 writes losses + gathered final weights
    (``<path>_<sharding>.pt``)."""
    for sharding in shardings.split(","):
        for path in ("meta", "plain"):
            model = scenario.build_meta() if path == "meta" else scenario.build(scenario.META_SCHEMA)
            par, trainer = sharded_trainer(sharding, model)
            torch.save(local_shards(trainer.model.state_dict()), out / f"{path}_{sharding}_init_rank{par.rank}.pt")
            losses = [trainer.step(my_part(scenario.global_batch(t, scenario.META_SCHEMA))).loss
                      for t in range(steps)]
            full = gather_full_state(trainer.model)
            if par.rank == 0:
                torch.save({"losses": losses, "state": full, "plan": par.plan}, out / f"{path}_{sharding}.pt")


def local_shards(state: dict) -> dict[str, list[tuple[list[int] | None, torch.Tensor]]]:
    """This rank's pieces of a sharded ``state_dict``: ``(shard offsets, values)`` per local shard."""
    out = {}
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            out[key] = [(list(s.metadata.shard_offsets), s.tensor.detach().clone()) for s in value.local_shards()]
        else:
            out[key] = [(None, value.detach().clone())]
    return out


def resume(sharding: str, out: Path, data_root: str, k: int, n: int) -> None:
    """Uninterrupted n-step run, and a run stopped at step k then resumed to n (fresh model + DCP load)."""
    register_configs()

    def cfg(name: str, max_steps: int, *extra: str) -> RunConfig:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            c = compose("train", overrides=[
                "data=tiny", "model=debug", f"data.root={data_root}", f"output_dir={out / name}",
                "train.progress=false", "train.log_every=1", "train.optim.warmup_steps=3", "data.loader.batch_size=8",
                f"train.checkpoint_every={k}", f"train.max_steps={max_steps}", "dist=gloo",
                f"dist.sharding={sharding}", *extra])
        return OmegaConf.to_object(c)

    if world_size_of_run() == 1:  # reshard: load the 2-rank checkpoint copied into "reshard1", no more steps
        train(cfg("reshard1", n))
        return
    train(cfg("straight", n))
    train(cfg("crashed", k))
    train(cfg("crashed", n))
    try:  # rank 0 checks the checkpoint's run configuration; every rank must get its refusal (no deadlock)
        train(cfg("crashed", n + 2, "train.optim.dense_lr=0.01"))
        message = "not refused"
    except InputError as e:
        message = str(e)
    (out / f"refused-rank{dist.get_rank()}.txt").write_text(message)


def world_size_of_run() -> int:
    return dist.get_world_size()


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        if sys.argv[1] == "match":
            match(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), *sys.argv[5:6])
        elif sys.argv[1] == "nonfinite":
            nonfinite(Path(sys.argv[2]))
        elif sys.argv[1] == "meta":
            meta(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
        elif sys.argv[1] == "resume":
            resume(sys.argv[2], Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
        else:
            raise SystemExit(f"unknown scenario {sys.argv[1]!r}")
    finally:
        dist.destroy_process_group()
