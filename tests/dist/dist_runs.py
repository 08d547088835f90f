"""Running the distributed tests' processes: ``torchrun`` on the worker script or a real ``-m recsys.*``
command, the single-process reference they are compared with, and how a refusal on the ranks looks."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dist_scenario as scenario
import torch
from cli_runner import cli_env, free_port, run_ranks

from recsys.data.schema import DataSchema
from recsys.dist.optim import make_optimizers
from recsys.model.heads import multitask_bce, multitask_listwise
from recsys.reliability.faults import ENV as FAULT_ENV

WORKER = Path(__file__).resolve().parent / "worker.py"
ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def torchrun(*args: str, nproc: int = 2, check: bool = True, fault: str | None = None, launcher: str = "fork"
             ) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node <nproc> <args>`` (the worker script, another ``.py`` script, or
    ``-m recsys.train ...``); ``fault``: ``RECSYS_FAULT`` of every rank (recsys/reliability/faults.py).
    ``launcher="fork"``: the ranks forked with torchrun's environment (``cli_runner.run_ranks``, no interpreter
    start-up per rank); ``"torchrun"``: the real launcher, for the tests of the command itself."""
    if args[0] == "-m":
        target, rest = args[1], args[2:]
    elif args[0].endswith(".py"):
        target, rest = args[0], args[1:]
    else:
        target, rest = str(WORKER), args
    env = {"PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT), **({FAULT_ENV: fault} if fault else {})}
    if launcher == "fork":
        proc = run_ranks(target, *rest, nproc=nproc, env=env)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), *([] if target.endswith(".py") else ["-m"]), target,
               *rest]
        proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(env), capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def single_process_reference(steps: int, schema: DataSchema = scenario.SCHEMA, build: Callable[[], Any] | None = None,
                             listwise: bool = False) -> tuple[list[float], dict[str, torch.Tensor]]:
    """What one process does on the whole global batches (the recsys.train step); ``build``: the model
    (default ``scenario.build(schema)``); ``listwise``: the listwise loss of ``model(batch) + prior`` on
    ``scenario.global_batch_with_prior`` (a residual ranker, ``train.loss=listwise``)."""
    model = build() if build is not None else scenario.build(schema)
    oc = scenario.optim_config()
    opt_sparse, opt_dense = make_optimizers(model, oc)
    dense = [p for g in opt_dense.param_groups for p in g["params"]]
    sched = torch.optim.lr_scheduler.LambdaLR(opt_dense, scenario.lr_lambda)
    losses = []
    for t in range(steps):
        if listwise:
            g = scenario.global_batch_with_prior(t)
            loss, _ = multitask_listwise(model(g) + g.prior[:, None], g.labels, g.cand_offsets)
        else:
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


WEIGHT_ATOL = 2e-5
"""Every weight of a distributed run within this of the single process: float32 sums in another order."""
OUTLIER_ATOL, OUTLIER_SHARE = 2e-4, 1e-3
"""...except a few elements (at most ``OUTLIER_SHARE`` of a tensor, at least one) within ``OUTLIER_ATOL``: AdamW
divides by the root of the second moment, so an element whose gradient is near zero turns a last-bit difference
of that gradient into a visible difference of its step (seen: one of 3,072 weights at 2.3e-5, the same under both
shardings). A bookkeeping error (a rank's gradient lost or counted twice) moves most elements by a dense step's
size (``dense_lr`` 3e-3 here), far beyond both bounds."""


def assert_weights_match(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], msg: str) -> None:
    """``got`` equals ``ref`` key for key up to float order (``WEIGHT_ATOL``, ``OUTLIER_*``)."""
    assert sorted(got) == sorted(ref), msg
    for k, v in ref.items():
        diff = (got[k].double() - v.double()).abs()
        torch.testing.assert_close(got[k], v, rtol=0, atol=OUTLIER_ATOL, msg=f"{msg}: {k}")
        outliers = int((diff > WEIGHT_ATOL).sum())
        assert outliers <= max(1, int(OUTLIER_SHARE * v.numel())), f"{msg}: {k}: {outliers} of {v.numel()} > {WEIGHT_ATOL}"


def assert_refused_on_the_ranks(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Refused like an operator mistake on the ranks: each exits 2 with one ``error:`` line naming every needle,
    and no traceback of ours (torchrun then fails too, printing its own launcher traceback). A rank still
    printing when torchrun stops the others may go unheard, so at least one line, all alike."""
    out = proc.stdout + proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert proc.returncode != 0 and lines and len(set(lines)) == 1, out[-4000:]
    assert proc.returncode == 2 or "exitcode  : 2" in proc.stderr, out[-4000:]  # forked ranks / torchrun's summary
    assert not [x for x in out.splitlines() if x.lstrip().startswith("File ") and "/recsys/" in x], out[-4000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
