"""Compile the Triton attention kernels for Hopper (sm_90) ahead of time, without a GPU.

Runs the real Triton compiler pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas bundled
in the Triton wheel) on every kernel, so type errors, bad control flow or shared-memory overflows
that the interpreter cannot see are caught on a CPU-only machine. Nothing is launched.

    .venv/bin/python tests/kernels/triton_aot_compile.py          # one config per kernel and dtype
    .venv/bin/python tests/kernels/triton_aot_compile.py --all    # every tile / warp / Dh combination

Must run with TRITON_INTERPRET unset (the kernels must be JITFunctions, not interpreted).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PTR_IN = {"Q", "K", "V", "Out", "PK", "PV", "DO", "DQ", "DK", "DV", "DPK", "DPV"}
PTR_F32 = {"Lse", "Delta"}
PTR_I64 = {"q_offsets", "kv_offsets", "prefix_offsets", "cand_offsets"}


def signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in PTR_IN:
            sig[name] = f"*{dtype}"
        elif name in PTR_F32:
            sig[name] = "*fp32"
        elif name in PTR_I64:
            sig[name] = "*i64"
        elif name.startswith("scale"):
            sig[name] = "fp32"
        else:  # strides, sizes, length buckets
            sig[name] = "i32"
    return sig


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--all", action="store_true", help="every tile / warp / head-dim combination")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 is set: kernels would be interpreted, nothing to compile", file=sys.stderr)
        return 2

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import triton_attention_common as common
    from kernels import triton_candidate_prefix_attention as cand
    from kernels import triton_jagged_causal_attention as jag

    target = GPUTarget("cuda", 90, 32)  # H100 / H200
    kernels = [
        jag._fwd_kernel, jag._bwd_dkdv_kernel, jag._bwd_dq_kernel,
        cand._fwd_kernel, cand._bwd_dq_kernel, cand._bwd_dkdv_own_kernel, cand._bwd_dkdv_prefix_kernel,
    ]
    if args.all:
        grid = [
            c for c in itertools.product(["fp16", "bf16", "fp32"], [(64, 64), (128, 64), (64, 128)], [32, 64], [4, 8], [3])
            if c[0] != "fp32" or c[1] == (64, 64)  # fp32 (ieee dots) only with the smallest tiles
        ]
    else:
        grid = [("fp16", (128, 64), 64, 8, 3), ("bf16", (64, 128), 32, 4, 2), ("fp32", (64, 64), 64, 4, 3)]
    combos = list(grid)
    n = 0
    for fn in kernels:
        for dtype, (bm, bn), dh, warps, stages in combos:
            constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=dh, DOT_IEEE=dtype == "fp32", UPCAST=False)
            src = ASTSource(fn, signature(fn, dtype, constexprs), constexprs)
            try:
                compiled = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
            except Exception as e:  # report which variant, then fail
                print(f"FAILED {fn.__name__} {dtype} {bm}x{bn} Dh={dh} w={warps} s={stages}: {e}", file=sys.stderr)
                return 1
            n += 1
            print(f"ok {fn.__name__:26s} {dtype} {bm:3d}x{bn:<3d} Dh={dh:<3d} w={warps} s={stages} smem={compiled.metadata.shared}")
    constexprs = dict(BLOCK_R=64, BLOCK_D=64)
    sig = {"Out": "*fp16", "DO": "*fp16", "Delta": "*fp32"}
    for name in common.attn_bwd_preprocess_kernel.arg_names:
        sig.setdefault(name, "constexpr" if name in constexprs else "i32")
    triton.compile(ASTSource(common.attn_bwd_preprocess_kernel, sig, constexprs), target=target)
    print(f"compiled {n + 1} kernel variants for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
