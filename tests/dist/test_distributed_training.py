"""Distributed training on real processes (torchrun, gloo, CPU) against a single process.

* 2 ranks on halves of the same global batches == 1 process on the whole batches (losses and
  final weights), for row-wise and table-wise tables. Why they must agree: see the gradient
  bookkeeping in recsys/dist/wrap.py. The reference is the single-process training math of
  ``recsys.train`` (torchrec ``RowWiseAdagrad`` stepped after backward, AdamW, clipping, the
  same LR schedule); the distributed side uses FBGEMM's fused row-wise Adagrad in backward.
  Tolerance: 1e-5 relative on the loss, 2e-5 absolute on every weight -- float32 sums in a
  different order (all-to-all, reduce-scatter, all-reduce), nothing else.
* save at step k with 2 ranks, restart from the DCP checkpoint, continue == uninterrupted run;
  then 1 rank (table-wise) loads the 2-rank (row-wise) checkpoint: DCP reshards, weights bit-equal;
  a resume under another run configuration is refused on every rank.
* the run-directory rules of ``recsys.train`` on the real ``torchrun -m recsys.dist`` command:
  ``train.resume=false`` into a directory with checkpoints, and a directory another process holds, are
  refused (exit 2 on the ranks, before any training), inputs untouched.
* real ``torchrun -m recsys.train`` ranks SIGKILLed between checkpoints, then resumed: bit-exact;
* a NaN loss on one rank skips the step on both and moves no weight, table or optimizer state; a
  non-finite gradient (finite loss) stops both ranks before the dense step;
* semantic-ID items (the ``sid_table`` sharded too): 2 ranks == 1 process;
* a baseline under N ranks is refused before any work.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dist_scenario as scenario
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from hostile_helpers import file_digests, hold_lock  # noqa: E402  (one copy of the lock holder)

from recsys.data.schema import DataSchema
from recsys.dist.optim import make_optimizers
from recsys.model.heads import multitask_bce
from recsys.reliability.checkpoint import CheckpointManager, load_checkpoint
from recsys.reliability.faults import ENV as FAULT_ENV
from recsys.reliability.rundir import LOCK_NAME

WORKER = Path(__file__).resolve().parent / "worker.py"
ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, check: bool = True, fault: str | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node <nproc> <args>`` (the worker script, or ``-m recsys.train ...``);
    ``fault``: ``RECSYS_FAULT`` of every rank (recsys/reliability/faults.py)."""
    target = list(args) if args[0] == "-m" else [str(WORKER), *args]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), *target]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def single_process_reference(steps: int, schema: DataSchema = scenario.SCHEMA, build: Callable[[], Any] | None = None
                             ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """What one process does on the whole global batches (the recsys.train step); ``build``: the model
    (default ``scenario.build(schema)``)."""
    model = build() if build is not None else scenario.build(schema)
    oc = scenario.optim_config()
    opt_sparse, opt_dense = make_optimizers(model, oc)
    dense = [p for g in opt_dense.param_groups for p in g["params"]]
    sched = torch.optim.lr_scheduler.LambdaLR(opt_dense, scenario.lr_lambda)
    losses = []
    for t in range(steps):
        g = scenario.global_batch(t, schema)
        loss, _ = multitask_bce(model(g), g.labels)
        opt_sparse.zero_grad(set_to_none=True)
        opt_dense.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dense, oc.clip_grad_norm)
        opt_sparse.step()
        opt_dense.step()
        sched.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    return single_process_reference(STEPS)


def test_two_ranks_match_one_process_on_the_same_global_batch(tmp_path, reference):
    shardings = ("row_wise", "table_wise")
    torchrun("match", ",".join(shardings), str(STEPS), str(tmp_path))  # one launch, both plans in turn
    ref_losses, ref_state = reference
    init = scenario.build().state_dict()
    for sharding in shardings:
        got = torch.load(tmp_path / f"dist_{sharding}.pt", weights_only=True)
        plan = got["plan"]
        assert {t["sharding"] for t in plan.values()} == {sharding}, plan
        if sharding == "row_wise":
            assert all(t["ranks"] == [0, 1] for t in plan.values()), plan
        else:  # whole tables, spread over both ranks
            assert all(len(t["ranks"]) == 1 for t in plan.values()), plan
            assert {r for t in plan.values() for r in t["ranks"]} == {0, 1}, plan
        assert got["losses"] == pytest.approx(ref_losses, rel=1e-5), sharding
        assert sorted(got["state"]) == sorted(ref_state)
        for k, v in ref_state.items():
            if "embeddings" in k:  # the run really moved the tables (rows of both ranks' lookups)
                assert not torch.equal(v, init[k]), k
            torch.testing.assert_close(got["state"][k], v, rtol=0, atol=2e-5, msg=f"{sharding}: {k}")


def test_two_ranks_match_one_process_with_semantic_id_items(tmp_path):
    """``item_embedding.mode=both``: the ``sid_table`` is sharded under the checked plan like every other table
    (built on meta, fused optimizer), and 2 ranks equal one process, tables and SID table included."""
    shardings = ("row_wise", "table_wise")
    torchrun("match", ",".join(shardings), str(STEPS), str(tmp_path), "sid")
    ref_losses, ref_state = single_process_reference(STEPS, build=scenario.build_sid)
    init = scenario.build_sid().state_dict()
    sid_key = next(k for k in ref_state if k.endswith("sid_table.weight"))
    assert not torch.equal(ref_state[sid_key], init[sid_key])  # the reference moved the SID table
    for sharding in shardings:
        got = torch.load(tmp_path / f"sid_{sharding}.pt", weights_only=True)
        plan = got["plan"]
        assert plan["sid_table"]["sharding"] == sharding and {t["sharding"] for t in plan.values()} == {sharding}
        assert got["losses"] == pytest.approx(ref_losses, rel=1e-5), sharding
        assert sorted(got["state"]) == sorted(ref_state)
        for k, v in ref_state.items():
            torch.testing.assert_close(got["state"][k], v, rtol=0, atol=2e-5, msg=f"{sharding}: {k}")


def test_resume_from_a_two_rank_checkpoint_continues_the_same_run(tmp_path):
    k, n = 3, 7
    torchrun("resume", "row_wise", str(tmp_path), str(tmp_path / "data"), str(k), str(n))

    def losses(name: str) -> dict[int, float]:
        rows = [json.loads(x) for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    straight, crashed = losses("straight"), losses("crashed")
    assert sorted(straight) == sorted(crashed) == list(range(1, n + 1))
    for step in range(1, n + 1):
        assert crashed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step
    report = json.loads((tmp_path / "crashed" / "report.json").read_text())
    assert report["resumed_from"].endswith(f"step_{k}") and report["steps"] == n and report["world_size"] == 2
    straight_report = json.loads((tmp_path / "straight" / "report.json").read_text())
    assert report["test_auc"] == pytest.approx(straight_report["test_auc"], abs=1e-6)
    # then a resume of "crashed" with another dense_lr: rank 0 compares the checkpoint's config, both ranks refuse
    for rank in (0, 1):
        refused = (tmp_path / f"refused-rank{rank}.txt").read_text()
        assert "is of another run configuration" in refused and "train.optim.dense_lr" in refused, (rank, refused)
        assert f"crashed/dist_checkpoints/step_{n}" in refused, refused
    assert json.loads((tmp_path / "crashed" / "report.json").read_text()) == report  # nothing rewritten

    # Different world size: 1 rank (table-wise) loads the 2-rank (row-wise) checkpoint; DCP reshards the tables.
    shutil.copytree(tmp_path / "straight", tmp_path / "reshard1")
    before = torch.load(tmp_path / "straight" / "checkpoints" / f"step_{n}.pt", weights_only=True)["model"]
    torchrun("resume", "table_wise", str(tmp_path), str(tmp_path / "data"), str(k), str(n), nproc=1)
    after = torch.load(tmp_path / "reshard1" / "checkpoints" / f"step_{n}.pt", weights_only=True)["model"]
    resharded = json.loads((tmp_path / "reshard1" / "report.json").read_text())
    assert resharded["world_size"] == 1 and resharded["resumed_from"].endswith(f"step_{n}")
    assert {t["sharding"] for t in resharded["sharding"].values()} == {"table_wise"}
    assert sorted(after) == sorted(before)
    for key, v in before.items():
        assert torch.equal(after[key], v), key


def assert_refused_on_the_ranks(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Refused like an operator mistake on the ranks: each exits 2 with one ``error:`` line naming every needle,
    and no traceback of ours (torchrun then fails too, printing its own launcher traceback). A rank still
    printing when torchrun stops the others may go unheard, so at least one line, all alike."""
    out = proc.stdout + proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert proc.returncode != 0 and lines and len(set(lines)) == 1, out[-4000:]
    assert "exitcode  : 2" in proc.stderr, out[-4000:]
    assert not [x for x in out.splitlines() if x.lstrip().startswith("File ") and "/recsys/" in x], out[-4000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_dist_cli_refuses_resume_false_over_checkpoints_and_a_locked_dir(tmp_path):
    """Both refusals happen before the dataset is prepared or a step is trained, on rank 0, and reach every
    rank (torchrun ends; a deadlocked rank would hit the timeout)."""
    old = tmp_path / "old-run"
    (old / "dist_checkpoints" / "step_4").mkdir(parents=True)
    for name in (".metadata", "trainer.pt"):  # what marks a complete DCP checkpoint; never read here
        (old / "dist_checkpoints" / "step_4" / name).write_bytes(b"an earlier run's checkpoint")
    before = file_digests(old)
    args = ["-m", "recsys.dist", "dist=gloo", "model=debug", "data=tiny", f"data.root={tmp_path / 'data'}",
            "train.progress=false", "train.max_steps=2"]
    locked = tmp_path / "locked"
    with hold_lock(locked) as holder, ThreadPoolExecutor(max_workers=2) as pool:
        resume_false = pool.submit(torchrun, *args, f"output_dir={old}", "train.resume=false", check=False)
        in_use = pool.submit(torchrun, *args, f"output_dir={locked}", check=False)
        resume_false, in_use = resume_false.result(), in_use.result()
    assert_refused_on_the_ranks(resume_false, f"output_dir={old} already holds checkpoints",
                                f"step_4 in {old / 'dist_checkpoints'}", "train.fresh_run=true")
    assert {k: v for k, v in file_digests(old).items() if Path(k).name != LOCK_NAME} == before
    assert_refused_on_the_ranks(in_use, f"output_dir={locked} is in use by another process (pid {holder.pid}")
    assert sorted(p.name for p in locked.iterdir()) == [LOCK_NAME]
    assert not (tmp_path / "data").exists()  # refused before the dataset was prepared


def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank_and_moves_nothing(tmp_path):
    """The guard decides on the all-reduced loss before backward: the fused table update never runs. A finite
    loss with non-finite gradients cannot be skipped once the fused tables stepped: every rank stops before
    the dense step (docs/reliability.md)."""
    torchrun("nonfinite", str(tmp_path))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"nonfinite-rank{rank}.pt", weights_only=True)
        assert got["skipped"] == "loss", (rank, got)
        assert got["tables"] > 0 and got["keys"] > got["tables"], got  # table shards, accumulators and dense seen
        assert got["unchanged"] and got["sched_unchanged"], (rank, got)
        assert "fused optimizer already applied this step" in got["grad_error"], (rank, got["grad_error"])
        assert got["dense_unchanged"], rank


def test_sigkill_between_checkpoints_under_two_ranks_then_resume_is_bit_exact(tmp_path):
    """Real ``torchrun -m recsys.train`` runs: every rank SIGKILLs itself after its 5th step (fault point
    ``train.after_step``, checkpoint at 3); the restart resumes the DCP checkpoint (each rank's RNG, the global
    popularity counts) and ends with the same report, log and weights as an uninterrupted run, bit for bit."""
    args = ["-m", "recsys.train", "dist=gloo", "dist.sharding=row_wise", "model=debug", "model.attention_backend=torch",
            "data=tiny", f"data.root={tmp_path / 'data'}", "train.progress=false", "train.log_every=1",
            "train.checkpoint_every=3", "train.max_steps=8", "train.optim.warmup_steps=3",
            "train.optim.lr_decay=cosine", "data.loader.batch_size=8", "data.loader.shuffle=true"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    torchrun(*args, f"output_dir={straight}")  # also prepares the data the other runs read
    killed = torchrun(*args, f"output_dir={crashed}", fault="train.after_step@5", check=False)
    assert killed.returncode != 0 and "exitcode  : -9" in killed.stderr, killed.stderr[-3000:]
    assert not (crashed / "report.json").exists()
    assert sorted(p.name for p in (crashed / "dist_checkpoints").iterdir()) == ["step_3"]
    torchrun(*args, f"output_dir={crashed}")
    a, b = (json.loads((d / "report.json").read_text()) for d in (straight, crashed))
    assert b["resumed_from"].endswith("dist_checkpoints/step_3") and not a["resumed_from"]
    assert a["steps"] == b["steps"] == 8 and a["world_size"] == b["world_size"] == 2
    a["config"].pop("output_dir"), b["config"].pop("output_dir")
    for key in sorted(set(a) - {"train_samples_per_s", "train_requests_per_s", "train_time_s", "resumed_from"}):
        if key.endswith("gauc"):  # per-user AUCs are summed in polars' group order, which varies run to run
            assert b[key] == pytest.approx(a[key], rel=1e-12, abs=0), key
        else:
            assert b[key] == a[key], key
    logs = [[json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()] for d in (straight, crashed)]
    strip = [[{k: v for k, v in r.items() if k != "samples_per_s"} for r in log] for log in logs]
    assert [r["step"] for r in strip[1]] == list(range(1, 9)) and strip[0] == strip[1]  # every step once, same loss
    fa, fb = (load_checkpoint(CheckpointManager(d / "checkpoints").paths()[-1])["model"] for d in (straight, crashed))
    assert fa.keys() == fb.keys() and any("embeddings" in k for k in fa)
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k


def test_a_baseline_under_n_ranks_is_refused_before_any_work(tmp_path):
    """The baselines keep their own torchrec tables, which the distributed strategy does not shard: refused
    by config, before the process group is joined, the output dir claimed or the data prepared."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from recsys.errors import InputError
    from recsys.train.config import register_configs
    from recsys.train.loop import train

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=[
            "model=dlrm", "data=tiny", "dist=gloo", f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}"]))
    with pytest.raises(InputError, match=r"model.arch=dlrm with dist=gloo: distributed training shards the OneTrans"):
        train(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
