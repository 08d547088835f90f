"""Block-stack levers measured in isolation: NS per-position matmul forms, bf16 autocast, torch.compile.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python bench/block_levers.py [--threads 1] [--compile]

Shapes: one default training batch's NS side, C = 4,096 candidates x N = 4 NS tokens, D = 64, FFN 256
(`configs/model/small.yaml`), and its S side, 16,000 S-token rows. Every variant runs forward + backward;
variants alternate inside each round (interleaved), medians over ``--rounds``. ``--compile`` adds
``torch.compile(ns_finish, dynamic=True)`` (compile time reported; minutes on 2 cores). Results and the
load average: ``bench/results/block_levers.json``. Conclusions: docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matmul_gflops, write_json  # noqa: E402

from recsys.model.block import OneTransBlock  # noqa: E402

C, N, D, FFN, S_ROWS = 4096, 4, 64, 256, 16000


def ffn_variants(blk: OneTransBlock) -> dict:
    """The NS FFN ``[C, N, D] -> [C, N, D]`` (per-position weights) written four ways (same math)."""
    w1, b1, w2, b2 = blk.ns_ffn1.weight, blk.ns_ffn1.bias, blk.ns_ffn2.weight, blk.ns_ffn2.bias

    def einsum(x):  # what PerPositionLinear does
        return blk.ns_ffn2(F.silu(blk.ns_ffn1(x)))

    def per_token_loop(x):
        return torch.stack([F.silu(x[:, n] @ w1[n] + b1[n]) @ w2[n] + b2[n] for n in range(x.shape[1])], 1)

    def baddbmm_view(x):
        h = torch.baddbmm(b1[:, None], x.transpose(0, 1), w1)
        return torch.baddbmm(b2[:, None], F.silu(h), w2).transpose(0, 1)

    def baddbmm_contiguous(x):
        h = torch.baddbmm(b1[:, None], x.transpose(0, 1).contiguous(), w1)
        return torch.baddbmm(b2[:, None], F.silu(h), w2).transpose(0, 1).contiguous()

    return {"ns_ffn einsum (current)": einsum, "ns_ffn per-token loop": per_token_loop,
            "ns_ffn baddbmm view": baddbmm_view, "ns_ffn baddbmm contiguous": baddbmm_contiguous}


def timed(fn, *inputs) -> float:
    t0 = time.perf_counter()
    fn(*inputs).float().sum().backward()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    blk = OneTransBlock(D, 4, FFN, N)
    x = torch.randn(C, N, D, requires_grad=True)
    attn = torch.randn(C, N, 4, D // 4, requires_grad=True)
    s = torch.randn(S_ROWS, D, requires_grad=True)

    def bf16(fn):
        def run(*a):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*a)
        return run

    variants = {name: (fn, (x,)) for name, fn in ffn_variants(blk).items()}
    variants |= {"ns_finish fp32": (blk.ns_finish, (x, attn)), "ns_finish bf16 autocast": (bf16(blk.ns_finish), (x, attn)),
                 "s_finish fp32": (blk.s_finish, (s, s.view(-1, 4, D // 4))),
                 "s_finish bf16 autocast": (bf16(blk.s_finish), (s, s.view(-1, 4, D // 4)))}
    extra = {}
    if args.compile:
        t0 = time.perf_counter()
        compiled = torch.compile(blk.ns_finish, dynamic=True)
        for c in (C, C - 96, C - 196):  # candidate counts vary batch to batch
            timed(compiled, torch.randn(c, N, D, requires_grad=True), torch.randn(c, N, 4, D // 4, requires_grad=True))
        extra["compile_s_three_shapes"] = time.perf_counter() - t0
        variants["ns_finish compiled"] = (compiled, (x, attn))
    load = [os.getloadavg()]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (fn, inputs) in variants.items():
            times[name].append(timed(fn, *inputs))
    load.append(os.getloadavg())
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, ms in med.items():
        print(f"{name:28s} fwd+bwd median {ms:8.1f} ms")
    print(f"load {load[0][0]:.2f} -> {load[1][0]:.2f}; {extra}")
    print(write_json("block_levers", {"machine": machine(), "loadavg": load, "median_ms": med, "ms": times,
                                      "matmul_gflops": {"fp32": matmul_gflops(torch.float32),
                                                        "bf16": matmul_gflops(torch.bfloat16)}, **extra}))


if __name__ == "__main__":
    main()
