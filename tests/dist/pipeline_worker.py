"""Run by tests/dist/test_pipeline.py under ``torchrun --nproc_per_node 2`` (gloo, CPU):

    torchrun ... tests/dist/pipeline_worker.py <sharding> <out_dir>

The same 2-rank training (worker.py's production pieces on dist_scenario.py's global batches) driven twice
from the same initial weights: eagerly (``recsys.dist.pipeline.Eager``, what ``dist.pipeline=none`` runs)
and by torchrec's ``TrainPipelineSparseDist`` (``SparseDistPipeline``, ``dist.pipeline=sparse_dist``).
Step ``NAN_STEP`` has a NaN label on rank 1 (a non-finite global loss: both drivers must skip the whole
update); each rank snapshots its weights / table shards / optimizer state around that step. Rank 0 writes
the losses and the gathered weights after ``REF_STEPS`` steps (compared with one process) and at the end to
``<out_dir>/pipeline_<sharding>.pt``; every rank writes its skip findings to ``skip-rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_scenario as scenario  # noqa: E402
from worker import local_snapshot, my_part, sharded_trainer  # noqa: E402

from recsys.dist.pipeline import Eager, SparseDistPipeline  # noqa: E402
from recsys.dist.sharding import gather_full_state  # noqa: E402

REF_STEPS = 4  # the steps the single-process reference runs (tests/dist/test_distributed_training.py)
NAN_STEP = 4
STEPS = 6


def batches() -> list:
    out = [my_part(scenario.global_batch(t)) for t in range(STEPS)]
    if dist.get_rank() == 1:
        out[NAN_STEP].labels[0, 0] = float("nan")
    return out


def drive(pipelined: bool, sharding: str) -> dict:
    par, trainer = sharded_trainer(sharding)
    driver = (SparseDistPipeline(trainer.model, trainer.opt.dense, par.device, trainer.forward, trainer.update)
              if pipelined else Eager(trainer.step))
    it = iter(batches())
    losses, skipped, found = [], [], {}
    for t in range(STEPS):
        if t == NAN_STEP:
            before, last_epoch = local_snapshot(trainer), trainer.opt.sched.last_epoch
        res, batch, _ = driver.step(it)
        assert batch.num_requests == scenario.global_batch(t).num_requests // dist.get_world_size()
        losses.append(res.loss)
        skipped.append(res.skipped)
        if t == NAN_STEP:
            after = local_snapshot(trainer)
            found = {"keys": len(before), "tables": sum("embeddings" in k for k in before),
                     "unchanged": sorted(before) == sorted(after) and all(torch.equal(before[k], after[k])
                                                                          for k in before),
                     "sched_unchanged": trainer.opt.sched.last_epoch == last_epoch}
        if t == REF_STEPS - 1:
            at_ref = gather_full_state(trainer.model)
    modules = driver.pipelined_modules if pipelined else []
    driver.close()
    return {"losses": losses, "skipped": skipped, "at_ref": at_ref, "final": gather_full_state(trainer.model),
            "found": found, "pipelined_modules": modules}


def main(sharding: str, out: Path) -> None:
    eager, piped = drive(False, sharding), drive(True, sharding)
    rank = dist.get_rank()
    torch.save({"eager": eager["found"], "pipelined": piped["found"]}, out / f"skip-rank{rank}.pt")
    if rank == 0:
        torch.save({name: {k: v for k, v in r.items() if k != "found"} for name, r in
                    (("eager", eager), ("pipelined", piped))}, out / f"pipeline_{sharding}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        main(sys.argv[1], Path(sys.argv[2]))
    finally:
        dist.destroy_process_group()
