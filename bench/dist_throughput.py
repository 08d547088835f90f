"""Training throughput: one process vs torchrun with 1 and 2 ranks (torchrec DMP, gloo, CPU), and the
2-rank step pipelined by torchrec's ``TrainPipelineSparseDist`` vs not (``dist.pipeline``).

    .venv/bin/python bench/dist_throughput.py [--steps 20] [--batch 16] [--model small] [--users 300] [--repeats 1]
    .venv/bin/python bench/dist_throughput.py --only-pipeline --steps 20 --repeats 3   # the pipeline part alone

Runs, each a real job on the synthetic data (``--users`` of them, to keep evaluation short) (``recsys.train`` / ``recsys.dist``):

* ``plain``: ``python -m recsys.train`` (no DMP), batch B;
* ``dmp_x1``: ``torchrun --nproc_per_node 1 -m recsys.dist dist=gloo``, batch B;
* ``dmp_x2_weak``: 2 ranks x batch B (global 2B);
* ``dmp_x2_strong``: 2 ranks x batch B/2 (global B, the same global batch as ``dmp_x1``).

Threads: ``OMP_NUM_THREADS`` = cores / ranks by default (``--threads-per-rank`` overrides).
Quoted: ``train_samples_per_s`` from each report (global candidates / model-step time of the
slowest rank; reading and collating excluded, as in ``recsys.train``), ratios to ``plain``
within the run, median over ``--repeats``. The JSON (``bench/results/dist_throughput.json``)
also records wall times and the load average, because on a shared 2-core machine the numbers
move with whatever else runs.

Pipeline part (``pipeline`` in the JSON; ``--skip-pipeline`` leaves it out): one ``torchrun --nproc_per_node 2``
launch of ``bench/dist_pipeline_worker.py`` times eager (``none``) and pipelined (``sparse_dist``) steps side
by side on the same pre-read batches (reading excluded from both), alternating per repeat; medians of the
slowest rank's step time, and from one profiled pass per driver the all-to-all time that runs while the main
thread computes vs serialized. Last printed line: the JSON path.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, nproc: int, batch: int, args: argparse.Namespace, out: Path) -> dict:
    common = [f"model={args.model}", f"data.synthetic.num_users={args.users}", f"data.loader.batch_size={batch}", f"train.max_steps={args.steps}",
              "train.progress=false", "train.resume=false", "train.checkpoint_every=0", "train.eval_max_batches=1",
              f"output_dir={out}"]
    threads = str(args.threads_per_rank or max(1, (os.cpu_count() or 1) // max(nproc, 1)))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONWARNINGS": "ignore"}
    if nproc == 0:
        cmd = [sys.executable, "-m", "recsys.train", *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(_port()), "-m", "recsys.dist", "dist=gloo", *common]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    rep = json.loads((out / "report.json").read_text())
    return {"name": name, "ranks": max(nproc, 1), "batch_per_rank": batch, "threads_per_rank": int(threads),
            "samples_per_s": rep["train_samples_per_s"], "train_time_s": rep["train_time_s"],
            "steps": rep["steps"], "wall_s": wall, "load_avg_1m_before": load0, "test_auc": rep["test_auc"]}


SCALING_NOTE = ("2 ranks on a machine with {cores} CPU cores shared with other jobs: both ranks compete for the "
                "same cores, so neither the x2 ratios nor the pipeline's gain show real scaling; the pipeline can "
                "only hide the input all-to-all behind compute when the ranks have cores (or GPUs) of their own.")


def run_pipeline(args: argparse.Namespace) -> dict:
    """Eager vs pipelined 2-rank steps in one launch (bench/dist_pipeline_worker.py)."""
    out = ROOT / args.out / "pipeline.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    overrides = [f"model={args.model}", f"data.synthetic.num_users={args.users}",
                 f"data.loader.batch_size={args.batch}", f"output_dir={ROOT / args.out / 'pipeline_run'}"]
    threads = str(args.threads_per_rank or max(1, (os.cpu_count() or 1) // 2))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), str(ROOT / "bench" / "dist_pipeline_worker.py"), str(out),
           str(args.steps), str(args.repeats), *overrides]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"pipeline part failed:\n{proc.stderr[-4000:]}")
    res = json.loads(out.read_text())
    res.update({"wall_s": time.perf_counter() - t0, "loadavg_before": load0, "loadavg_after": os.getloadavg(),
                "threads_per_rank": int(threads), "batch_per_rank": args.batch, "model": args.model})
    s = res["summary"]
    print(f"pipeline x2: none {s['none']['step_ms_median']:.1f} ms/step, sparse_dist "
          f"{s['sparse_dist']['step_ms_median']:.1f} ms/step (x{s['speedup_pipelined']:.2f}); all-to-all "
          f"concurrent with compute: none {s['none']['profile']['concurrent_fraction']:.0%}, sparse_dist "
          f"{s['sparse_dist']['profile']['concurrent_fraction']:.0%}  (load {load0[0]:.1f})", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16, help="requests per rank (weak scaling)")
    ap.add_argument("--model", default="small")
    ap.add_argument("--users", type=int, default=300, help="synthetic users (sets the eval split sizes)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads-per-rank", type=int, default=0,
                    help="OMP threads per process (0 = cores / ranks; 1 is steadier on a loaded machine)")
    ap.add_argument("--out", default="runs/bench_dist")
    ap.add_argument("--skip-pipeline", action="store_true", help="leave out the pipelined vs eager part")
    ap.add_argument("--only-pipeline", action="store_true", help="only the pipelined vs eager part")
    args = ap.parse_args()
    note = SCALING_NOTE.format(cores=os.cpu_count())
    pipeline = None if args.skip_pipeline else run_pipeline(args)
    if args.only_pipeline:
        print(json.dumps(pipeline["summary"], indent=2))
        print(write_json("dist_pipeline", {"machine": machine(), "cpu_count": os.cpu_count(), "args": vars(args),
                                           "scaling_note": note, "pipeline": pipeline}))
        return
    configs = [("plain", 0, args.batch), ("dmp_x1", 1, args.batch), ("dmp_x2_weak", 2, args.batch),
               ("dmp_x2_strong", 2, args.batch // 2)]
    rows: dict[str, list[dict]] = {c[0]: [] for c in configs}
    for r in range(args.repeats):
        for name, nproc, batch in configs:
            res = run(name, nproc, batch, args, ROOT / args.out / f"{name}_{r}")
            rows[name].append(res)
            print(f"{name:14s} rep {r}: {res['samples_per_s']:8.0f} candidates/s  (wall {res['wall_s']:.0f} s, "
                  f"load {res['load_avg_1m_before']:.1f})", flush=True)
    summary = {name: {"samples_per_s_median": median(x["samples_per_s"] for x in v),
                      "wall_s_median": median(x["wall_s"] for x in v)} for name, v in rows.items()}
    base = summary["plain"]["samples_per_s_median"]
    for v in summary.values():
        v["ratio_to_plain"] = v["samples_per_s_median"] / base
    print(json.dumps(summary, indent=2))
    path = write_json("dist_throughput", {"machine": machine(), "cpu_count": os.cpu_count(), "args": vars(args),
                                          "summary": summary, "runs": rows, "scaling_note": note,
                                          "pipeline": pipeline})
    print(path)


if __name__ == "__main__":
    main()
