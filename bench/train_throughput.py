"""Training throughput of the OneTrans ranker, with and without the pyramid, on CPU; or two versions side by side.

    .venv/bin/python bench/train_throughput.py [--quick]
    .venv/bin/python bench/train_throughput.py --compare [--a-commit SHA | --a-tree DIR] [--b-...]
        [--a-override k=v ...] [--b-override k=v ...] [--a-bf16] [--b-bf16] [--shapes default long]
        [--threads 1 2] [--rounds 5] [--batches 2] [--preset small] [--task train|score]

``--compare``: arms A and B (default: both this working tree, no overrides; ``--a-commit`` checks
a commit out with ``git worktree`` into a temporary directory, removed after) each run in their own
worker process (``PYTHONPATH`` = the arm's tree, so its ``recsys`` and ``kernels`` are imported) on the
same real batches of ``bench/train_workload.py`` (``default``: the embedded dataset; ``long``: median
300 events, one candidate per request), the ``recsys.train`` step. Rounds alternate A, B / B, A
(interleaved, one worker runs at a time); medians per step, ``os.getloadavg()`` before and after each
shape. ``--task score``: ``CachedScorer.score_batch`` on test batches instead (a fresh user cache
per pass, eval mode, no grad). JSON: ``bench/results/<task>_compare.json``.

For each configuration: median step time over random jagged batches with heavy-tailed
history lengths, candidates/s, and achieved GFLOP/s, next to the fp32 matmul GFLOP/s
measured in the same run. FLOPs per step = 3 x forward FLOPs (backward ~ 2 x forward);
forward FLOPs come from `recsys.model.pyramid.batch_flops` (matmuls only: projections,
attention QK^T and PV, FFN; embeddings, norms and softmax are not counted).
Last printed line: the JSON path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO_ROOT = Path(__file__).resolve().parents[1]
from common import machine, matmul_gflops, median_ms, write_json  # noqa: E402

from recsys.model.config import ModelConfig, PyramidConfig  # noqa: E402
from recsys.model.heads import multitask_bce  # noqa: E402
from recsys.model.pyramid import batch_flops  # noqa: E402
from recsys.model.ranker import OneTransRanker  # noqa: E402
from recsys.testing import random_request_batch, tiny_schema  # noqa: E402


def make_batch(requests: int, candidates: int, median_history: float, max_len: int):
    """``(schema, history lengths, RequestBatch)``: heavy-tailed histories (lognormal, sigma 1.2)."""
    rng = np.random.default_rng(0)
    schema = tiny_schema(kinds=("click",), tasks=("click", "like"))
    lengths = np.minimum(rng.lognormal(np.log(median_history), 1.2, requests).astype(int), max_len).tolist()
    return schema, lengths, random_request_batch(schema, lengths, [candidates] * requests, seed=0)


def build_model(schema, pyr: PyramidConfig, max_len: int, backend: str = "torch", device: str = "cpu"):
    """The bench's ranker (d_model 128, 4 heads, 4 layers, N = 4) and its config, on ``device``."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=128, n_heads=4, n_layers=4, n_ns_tokens=4, emb_dim=32, head_hidden=128,
                      pyramid=pyr, attention_backend=backend)
    return OneTransRanker(schema, cfg, max_s_tokens=max_len).to(device), cfg


def step_record(name: str, model: OneTransRanker, cfg: ModelConfig, step, lengths: list[int], candidates: int,
                repeats: int, ceiling: float) -> dict:
    """Median time of ``step()`` (one optimizer step) -> candidates/s and achieved GFLOP/s."""
    ms = median_ms(step, repeats=repeats, warmup=1)
    fwd = batch_flops(model.schedule, lengths, [candidates] * len(lengths), model.tokenizer.n_ns,
                      cfg.d_model, cfg.ffn_mult * cfg.d_model)
    return {"config": name, "pyramid": model.schedule.describe(), "step_ms_median": ms,
            "candidates_per_s": candidates * len(lengths) / (ms / 1e3),
            "train_gflop_per_step": 3 * fwd / 1e9, "achieved_gflops": 3 * fwd / (ms / 1e3) / 1e9,
            "matmul_fp32_gflops": ceiling}


def batch_step(model: OneTransRanker, batch, device: str = "cpu"):
    """One AdamW step on ``batch`` (synchronised on CUDA so host timers see the GPU work)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        loss, _ = multitask_bce(model(batch), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def scoring_step(model):
    """``CachedScorer.score_batch`` with a fresh user cache per pass (misses, then appends within the pass)."""
    from recsys.serving.cache import UserKVCache
    from recsys.serving.scorer import CachedScorer

    model.eval()
    state = {}

    def step(batch) -> None:
        if batch is state.get("first"):
            state["scorer"] = CachedScorer(model, UserKVCache(512 << 20), candidate_chunk=512)
        state["scorer"].score_batch(batch)
    return step, state


def worker(args) -> None:
    """One arm: build the batches and the step, then time one pass over the batches per ``run`` line."""
    from train_workload import TrainStep, load_batches, model_config

    torch.set_num_threads(args.threads[0])
    try:  # the allocator settings recsys.train and the scoring job apply, where the arm's tree has them
        from recsys.runtime.allocator import keep_freed_memory
    except ImportError:
        pass
    else:
        keep_freed_memory()
    schema, batches = load_batches(args.shape, args.batches, split="test" if args.task == "score" else "train")
    step = TrainStep(schema, model_config(args.preset, args.override), bf16=args.bf16)
    if args.task == "score":
        step, state = scoring_step(step.model)
        state["first"] = batches[0]
    t0 = time.perf_counter()
    for b in batches:  # warm-up
        step(b)
    print("READY " + json.dumps({"warmup_s": time.perf_counter() - t0,
                                 "candidates": [b.num_candidates for b in batches]}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        ms = []
        for b in batches:
            t = time.perf_counter()
            step(b)
            ms.append((time.perf_counter() - t) * 1e3)
        print("RESULT " + json.dumps(ms), flush=True)


class Arm:
    """A worker process of one arm (tree, model overrides, bf16)."""

    def __init__(self, tree: Path, shape: str, threads: int, args, overrides: list[str], bf16: bool) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--task", args.task, "--shape", shape,
               "--threads", str(threads),
               "--batches", str(args.batches), "--preset", args.preset, *(["--bf16"] if bf16 else []),
               "--override", *overrides]
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = json.loads(self._read("READY "))

    def _read(self, tag: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag):]
        raise RuntimeError(f"worker exited with {self.proc.wait()} before {tag.strip()}")

    def run(self) -> list[float]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return json.loads(self._read("RESULT "))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def checkout(commit: str | None, tree: str | None, stack: list[Path]) -> Path:
    """The arm's source tree: ``tree``, a temporary ``git worktree`` of ``commit``, or this repository."""
    if tree:
        return Path(tree).resolve()
    if not commit:
        return REPO_ROOT
    path = Path(tempfile.mkdtemp(prefix="train-compare-")) / "tree"
    subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", str(path), commit], check=True,
                   capture_output=True)
    stack.append(path)
    return path


def compare_shape(shape: str, threads: int, trees: dict[str, Path], args) -> dict:
    load = [os.getloadavg()]
    arms = {name: Arm(trees[name], shape, threads, args, getattr(args, f"{name}_override"),
                      getattr(args, f"{name}_bf16")) for name in ("a", "b")}
    times: dict[str, list[float]] = {"a": [], "b": []}
    try:
        for r in range(args.rounds):
            for name in (("a", "b") if r % 2 == 0 else ("b", "a")):
                times[name] += arms[name].run()
    finally:
        for arm in arms.values():
            arm.close()
    load.append(os.getloadavg())
    cands = arms["a"].ready["candidates"]
    rec = {"shape": shape, "threads": threads, "loadavg_before_after": load, "candidates_per_step": cands}
    for name in ("a", "b"):
        med = statistics.median(times[name])
        rec[name] = {"step_ms_median": med, "step_ms": times[name], "warmup_s": arms[name].ready["warmup_s"],
                     "candidates_per_s": statistics.mean(cands) / (med / 1e3)}
    rec["speedup_b_over_a"] = rec["a"]["step_ms_median"] / rec["b"]["step_ms_median"]
    print(f"{shape:8s} threads={threads}  A {rec['a']['step_ms_median']:8.0f} ms  B {rec['b']['step_ms_median']:8.0f} ms"
          f"  B/A speed-up {rec['speedup_b_over_a']:.2f}x  load {load[0][0]:.1f}->{load[1][0]:.1f}", flush=True)
    return rec


def compare(args) -> None:
    stack: list[Path] = []
    try:
        trees = {name: checkout(getattr(args, f"{name}_commit"), getattr(args, f"{name}_tree"), stack)
                 for name in ("a", "b")}
        records = [compare_shape(shape, t, trees, args) for shape in args.shapes for t in args.threads]
    finally:
        for path in stack:
            subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(path)], check=False)
            if path.parent.exists() and not any(path.parent.iterdir()):
                path.parent.rmdir()
    arms = {name: {"tree": str(trees[name]), "commit": getattr(args, f"{name}_commit"),
                   "override": getattr(args, f"{name}_override"), "bf16": getattr(args, f"{name}_bf16")}
            for name in ("a", "b")}
    print(write_json(f"{args.task}_compare", {"machine": machine(), "task": args.task, "arms": arms, "preset": args.preset,
                                       "rounds": args.rounds, "batches": args.batches, "records": records}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compare", action="store_true", help="two arms side by side (see the module docstring)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for arm in ("a", "b"):
        ap.add_argument(f"--{arm}-commit", help=f"arm {arm.upper()}: this git commit (temporary worktree)")
        ap.add_argument(f"--{arm}-tree", help=f"arm {arm.upper()}: this source tree")
        ap.add_argument(f"--{arm}-override", nargs="*", default=[], help="model key=value overrides")
        ap.add_argument(f"--{arm}-bf16", action="store_true", help="bf16 autocast (the train.bf16 step)")
    ap.add_argument("--shapes", nargs="+", default=["default", "long"])
    ap.add_argument("--task", choices=("train", "score"), default="train",
                    help="compare: the recsys.train step, or CachedScorer.score_batch on test batches")
    ap.add_argument("--threads", type=int, nargs="+", default=None, help="torch threads (compare: default 1)")
    ap.add_argument("--rounds", type=int, default=5, help="compare: alternating rounds (one pass each)")
    ap.add_argument("--batches", type=int, default=2, help="compare: batches per pass")
    ap.add_argument("--preset", default="small", help="compare: configs/model/<preset>.yaml")
    ap.add_argument("--shape", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--override", nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-len", type=int, default=256, help="max S tokens per request")
    ap.add_argument("--requests", type=int, default=64, help="requests per batch")
    ap.add_argument("--candidates", type=int, default=16, help="candidates per request")
    ap.add_argument("--median-history", type=float, default=60.0, help="median S tokens (lognormal, sigma 1.2)")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.compare:
        args.threads = args.threads or [1]
        return compare(args)
    if args.threads:
        torch.set_num_threads(args.threads[0])
    repeats = 3 if args.quick else 7
    schema, lengths, batch = make_batch(args.requests, args.candidates, args.median_history, args.max_len)
    ceiling = matmul_gflops(torch.float32)
    records = []
    for name, pyr in (("no_pyramid", PyramidConfig(mode="none")),
                      ("pyramid_linear", PyramidConfig(mode="linear", final=0, round_to=32))):
        model, cfg = build_model(schema, pyr, args.max_len)
        rec = step_record(name, model, cfg, batch_step(model, batch), lengths, args.candidates, repeats, ceiling)
        records.append(rec)
        print(f"{name:15s} {rec['pyramid']:>22s}  step {rec['step_ms_median']:8.1f} ms  {rec['candidates_per_s']:9.0f} cand/s  "
              f"{rec['achieved_gflops']:6.2f} GFLOP/s  (fp32 matmul ceiling {ceiling:.1f})")
    speedup = records[0]["step_ms_median"] / records[1]["step_ms_median"]
    flop_ratio = records[0]["train_gflop_per_step"] / records[1]["train_gflop_per_step"]
    print(f"pyramid: {speedup:.2f}x faster step, {flop_ratio:.2f}x fewer FLOPs (same run)")
    print(write_json("train_throughput", {"machine": machine(), "batch": {
        "requests": args.requests, "candidates_per_request": args.candidates, "max_len": args.max_len,
        "mean_history": float(np.mean(lengths))}, "records": records, "pyramid_speedup": speedup,
        "pyramid_flop_ratio": flop_ratio}))


if __name__ == "__main__":
    main()
