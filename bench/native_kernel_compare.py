"""The native CPU attention kernels of another commit against this tree's, interleaved, on synthetic shapes.

    PYTHONPATH=$PWD OMP_NUM_THREADS=2 .venv/bin/python bench/native_kernel_compare.py --a-commit <sha> \
        [--threads 2] [--rounds 2] [--lengths 16 64 256 512] [--prefixes 16 64 256]

Arm A: ``kernels/cpu/small_head_attention.cpp`` at ``--a-commit`` (``git show``), compiled with this tree's flags
into a temporary folder; arm B: this tree's library (``kernels.cpu_native.library``). Both run through this tree's
Python wrappers (``kernels/cpu_native.py``), so the commit's C ABI must match this tree's. Shapes: jagged causal
attention over 16k rows as n sequences of L (H = 4, D = 16); candidate-prefix attention for 256 requests x 16
candidates x N = 4 own tokens with prefixes of P rows. Per shape and direction: the best over ``--rounds``
alternating A / B rounds of the median of 9 calls, and the max abs difference of the two arms' outputs.
Writes ``bench/results/native_kernel_compare.json`` with the load average before and after.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median_ms, write_json  # noqa: E402

from kernels import cpu_native  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
H, D, SCALE = 4, 16, 0.25


def build_commit(commit: str, folder: Path) -> ctypes.CDLL:
    """The library built from ``commit``'s kernel source with this tree's flags."""
    source = folder / "small_head_attention.cpp"
    source.write_text(subprocess.run(["git", "show", f"{commit}:kernels/cpu/small_head_attention.cpp"], cwd=REPO,
                                     capture_output=True, text=True, check=True).stdout)
    out = folder / "a.so"
    subprocess.run([os.environ.get("CXX", "g++"), *cpu_native.FLAGS, str(source), "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    for name, args in cpu_native._SIGNATURES.items():
        if hasattr(lib, name):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def workloads(lengths: list[int], prefixes: list[int]) -> dict[str, tuple]:
    """``name -> (forward, backward)`` closures over fixed random inputs."""
    out = {}
    for length in lengths:
        n = (1 << 14) // length
        kv = torch.arange(n + 1) * length
        q, k, v = (torch.randn(n * length, H, D) for _ in range(3))
        do = torch.randn_like(q)

        def fwd(q=q, k=k, v=v, kv=kv):
            return cpu_native.jagged_fwd(q, k, v, kv, None, SCALE)

        def bwd(q=q, k=k, v=v, kv=kv, do=do, fwd=fwd):
            o, lse = fwd()
            return cpu_native.jagged_bwd(do, q, k, v, o, lse, kv, None, SCALE)
        out[f"jagged L={length}"] = (fwd, bwd)
    for p in prefixes:
        b, c, n_tok = 256, 16, 4
        po, co = torch.arange(b + 1) * p, torch.arange(b + 1) * c
        q, k, v = (torch.randn(b * c, n_tok, H, D) for _ in range(3))
        pk, pv = (torch.randn(b * p, H, D) for _ in range(2))
        do = torch.randn_like(q)

        def pfwd(q=q, k=k, v=v, pk=pk, pv=pv, po=po, co=co):
            return cpu_native.prefix_fwd(q, k, v, pk, pv, po, co, SCALE)

        def pbwd(q=q, k=k, v=v, pk=pk, pv=pv, po=po, co=co, do=do, pfwd=pfwd):
            o, lse = pfwd()
            return cpu_native.prefix_bwd(do, q, k, v, pk, pv, o, lse, po, co, SCALE)
        out[f"prefix P={p}"] = (pfwd, pbwd)
    return out


def run_arm(lib: ctypes.CDLL, fn) -> tuple[float, torch.Tensor]:
    """Median ms of ``fn`` with ``lib`` as the native library, and its first output."""
    saved = cpu_native.library
    cpu_native.library = lambda: lib
    try:
        result = fn()[0]
        return median_ms(fn, repeats=9), result
    finally:
        cpu_native.library = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a-commit", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256, 512])
    ap.add_argument("--prefixes", type=int, nargs="+", default=[16, 64, 256])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b_lib = cpu_native.library()
    if b_lib is None:
        raise SystemExit("this tree's native kernels are unavailable (see the message above)")
    load_before = os.getloadavg()
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        a_lib = build_commit(args.a_commit, Path(tmp))
        for name, fns in workloads(args.lengths, args.prefixes).items():
            for direction, fn in zip(("fwd", "fwd+bwd"), fns):
                times, outs = {"a": [], "b": []}, {}
                for r in range(args.rounds):
                    for arm in ("ab" if r % 2 == 0 else "ba"):
                        ms, outs[arm] = run_arm(a_lib if arm == "a" else b_lib, fn)
                        times[arm].append(ms)
                diff = float((outs["a"] - outs["b"]).abs().max())
                rec = {"a_ms": min(times["a"]), "b_ms": min(times["b"]), "max_abs_diff": diff}
                records[f"{name} {direction}"] = rec
                print(f"{name:16s} {direction:8s} A {rec['a_ms']:7.1f} ms  B {rec['b_ms']:7.1f} ms  "
                      f"B/A speed-up {rec['a_ms'] / rec['b_ms']:.2f}x  max abs diff {diff:.1e}", flush=True)
    print(f"load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    print(write_json("native_kernel_compare", {"machine": machine(), "a_commit": args.a_commit,
                                               "threads": args.threads, "records": records,
                                               "load_before": load_before, "load_after": os.getloadavg()}))


if __name__ == "__main__":
    main()
