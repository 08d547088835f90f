"""Both CPU attention ops, forward + backward, on the inputs of a real training step: this tree's
``kernels/torch_attention.py`` against another commit's, interleaved medians.

    PYTHONPATH=$PWD OMP_NUM_THREADS=2 .venv/bin/python bench/attention_op_compare.py --a-commit <sha> \
        [--shape default|long] [--threads 2] [--rounds 9]

The inputs are captured once from one ``recsys.train`` step of ``bench/train_workload.py`` (every call
of the jagged causal op on the S side and of the candidate-prefix op on the NS side, all layers), so
the lengths, the pyramid and the candidate counts are the real ones. Both arms run the same captured
inputs; each round runs all calls of one op through arm A then arm B (B then A on odd rounds). The
outputs and gradients of the two arms are compared too (max abs difference), since a lever here must
not change results. Writes ``bench/results/attention_op_compare-<shape>.json`` with the load average.

Only the Python file is swapped: where both commits dispatch fp32 calls to the native kernels
(``kernels/cpu_native.py``), both arms load this tree's library, so kernel changes need
``bench/native_kernel_compare.py`` (or ``RECSYS_NATIVE_ATTENTION=0`` to compare the ATen paths).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402
from train_workload import TrainStep, load_batches, model_config  # noqa: E402

from kernels import torch_attention as this_tree  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OPS = {"jagged": ("jagged_causal_attention_torch_fwd", "jagged_causal_attention_torch_bwd"),
       "candidate_prefix": ("candidate_prefix_attention_torch_fwd", "candidate_prefix_attention_torch_bwd")}


def capture(shape: str) -> dict[str, list[tuple]]:
    """Arguments of every forward call of both ops during one training step (tensors detached copies)."""
    calls: dict[str, list[tuple]] = {op: [] for op in OPS}
    originals = {op: getattr(this_tree, fwd) for op, (fwd, _) in OPS.items()}

    def recorder(op: str):
        def fwd(*args):
            calls[op].append(tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args))
            return originals[op](*args)
        return fwd

    schema, batches = load_batches(shape, 1)
    step = TrainStep(schema, model_config("small"))
    for op, (name, _) in OPS.items():
        setattr(this_tree, name, recorder(op))  # kernels.custom_ops looks the function up on every call
    try:
        step(batches[0])
    finally:
        for op, (name, _) in OPS.items():
            setattr(this_tree, name, originals[op])
    return calls


def load_commit(commit: str) -> ModuleType:
    """``kernels/torch_attention.py`` of ``commit`` as a module of its own (it imports only torch)."""
    source = subprocess.run(["git", "show", f"{commit}:kernels/torch_attention.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "torch_attention_a.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("torch_attention_a", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def run_op(module: ModuleType, op: str, calls: list[tuple], grads: list[torch.Tensor], keep: bool = False
           ) -> list[torch.Tensor]:
    """Forward and backward of every captured call; all outputs and gradients with ``keep`` (the comparison),
    none while timed (as in a step, each call's results are freed before the next layer's)."""
    fwd, bwd = (getattr(module, name) for name in OPS[op])
    results = []
    for args, grad in zip(calls, grads):
        out, lse = fwd(*args)
        if op == "jagged":
            q, k, v, kv_off, q_off, scale = args
            got = [out, *bwd(grad, q, k, v, out, lse, kv_off, q_off, scale)]
        else:
            q, k, v, pk, pv, po, co, scale = args
            got = [out, *bwd(grad, q, k, v, pk, pv, out, lse, po, co, scale)]
        results += got if keep else []
    return results


def compare(a: ModuleType, op: str, calls: list[tuple], rounds: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(args[0].shape, generator=gen) for args in calls]
    diff = max(float((x - y).abs().max()) for x, y in zip(run_op(a, op, calls, grads, keep=True),
                                                          run_op(this_tree, op, calls, grads, keep=True)))
    times: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(rounds):
        arms = [("a", a), ("b", this_tree)]
        for name, module in (arms if r % 2 == 0 else arms[::-1]):
            t0 = time.perf_counter()
            run_op(module, op, calls, grads)
            times[name].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"calls": len(calls), "median_ms": med, "speedup_b_over_a": med["a"] / med["b"], "max_abs_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a-commit", required=True, help="arm A: kernels/torch_attention.py of this commit")
    ap.add_argument("--shape", default="default", choices=("default", "long"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from recsys.runtime.allocator import keep_freed_memory
    keep_freed_memory()  # as in recsys.train (bench/train_throughput.py does the same)
    calls, a = capture(args.shape), load_commit(args.a_commit)
    load_before = os.getloadavg()
    records = {op: compare(a, op, calls[op], args.rounds) for op in OPS}
    for op, rec in records.items():
        print(f"{op:17s} {rec['calls']} calls  A {rec['median_ms']['a']:7.1f} ms  B {rec['median_ms']['b']:7.1f} ms  "
              f"B/A speed-up {rec['speedup_b_over_a']:.2f}x  max abs diff {rec['max_abs_diff']:.1e}")
    print(f"load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    print(write_json(f"attention_op_compare-{args.shape}", {
        "machine": machine(), "a_commit": args.a_commit, "shape": args.shape, "threads": args.threads,
        "rounds": args.rounds, "ops": records, "load_before": load_before, "load_after": os.getloadavg()}))


if __name__ == "__main__":
    main()
