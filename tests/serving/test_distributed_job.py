"""``torchrun --nproc_per_node 2 -m recsys.score``: real gloo processes, a SIGKILL of one rank, a rerun.

Rank 1 is killed (SIGKILL, from outside, like the OOM killer) right after its first partition; torchrun
then tears the job down. The rerun on 2 ranks (forked with torchrun's environment, ``cli_runner.run_ranks``)
completes the job: every (request, item) exactly once,
bit-identical to the 1-process run of the same job (conftest ``baseline``), with the summary metrics
computed over all partitions, whichever rank or run wrote them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from cli_runner import cli_env, free_port, run_ranks
from job_fixtures import SETTINGS, read_output

ROOT = Path(__file__).resolve().parents[2]


def torchrun_score(ckpt: Path, out: Path, *extra: str) -> subprocess.Popen:
    """``torchrun --nproc_per_node 2 -m recsys.score ...`` (gloo, CPU), started in the background."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "recsys.score", f"checkpoint={ckpt}", f"output_dir={out}",
           "device=cpu", *SETTINGS, *extra]
    env = cli_env({"PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)})
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker of ``rank`` (a child of the launcher with ``RANK=<rank>`` in its environment)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0") if ppid == launcher else []
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def test_sigkill_of_one_rank_then_rerun_equals_one_process(trained, baseline):
    tmp, ckpt = trained
    base, summary = baseline
    n_parts = summary["partitions_total"]
    out = tmp / "two-ranks"

    proc = torchrun_score(ckpt, out, "pause_after_partition_s=2.0")
    deadline = time.time() + 240
    while not (out / "part-00001.parquet").exists():  # rank 1's first partition (round-robin deal)
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "rank 1 wrote no partition in time"
        time.sleep(0.02)
    victim = rank_pid(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, stderr[-2000:]  # torchrun stops the whole job when a rank dies
    done = sorted(p.name for p in out.glob("part-*.parquet"))
    assert 2 <= len(done) < n_parts, done  # both ranks had written, the job was really cut short
    assert not (out / "summary.json").exists()

    proc = run_ranks("recsys.score", f"checkpoint={ckpt}", f"output_dir={out}", "device=cpu", *SETTINGS,
                     env={"PYTHONWARNINGS": "ignore"}, timeout=300)  # the rerun's ranks forked with torchrun's env
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    assert resumed["complete"] and resumed["world_size"] == 2
    assert resumed["partitions_skipped"] == len(done) and resumed["partitions_written"] == n_parts - len(done)
    assert sum(resumed["partitions_per_rank"]) == n_parts - len(done) and min(resumed["partitions_per_rank"]) >= 1
    assert not list(out.glob(".*tmp*"))

    got, want = read_output(out), read_output(base)
    assert got.equals(want)  # same rows, same order, bit-identical scores
    src = pl.read_parquet(resumed["inputs"]).select("request_id", pl.col("cand_item_id").alias("item_id"))
    count = lambda df: df.group_by("request_id", "item_id").len().sort("request_id", "item_id")  # noqa: E731
    assert count(got.select("request_id", "item_id")).equals(count(src.explode("item_id")))
    assert resumed["metrics"] == pytest.approx(summary["metrics"], rel=1e-12)  # merged over every partition
    plan = json.loads((out / "_job.json").read_text())["partitions"]
    rescored = [p["stop"] - p["start"] for i, p in enumerate(plan) if f"part-{i:05d}.parquet" not in done]
    assert resumed["requests"] == sum(rescored)  # the rerun scored the missing partitions only, each once
