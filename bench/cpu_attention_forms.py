"""The CPU attention primitive at the model's head dim: the native small-head kernels, ATen's flash kernel (fp32,
bf16) and explicit math.

    PYTHONPATH=$PWD OMP_NUM_THREADS=2 .venv/bin/python bench/cpu_attention_forms.py [--threads 2] [--dh 16] [--heads 4]

Causal ``[n, H, L, Dh]`` batches (``n * L`` = 16k rows, so every L does the same row count), through
``kernels.torch_attention.attend_fwd`` / ``attend_bwd``, the calls both CPU ops make per chunk: the
flash kernel in fp32 and in bf16, and the explicit fp32 matmul / softmax path (``_CPU_FLASH`` off). Forward
and forward + backward medians, and the flash fp32 rate in GFLOP/s (causal half of ``4 n H L^2 Dh`` per
direction, backward counted as 2.5x the forward's matmul FLOPs). ``native``: the same batch as n jagged
sequences of L rows through ``kernels.cpu_native`` (what the torch backend runs for fp32 at these head
sizes), the same GFLOP/s count. Writes
``bench/results/cpu_attention_forms.json`` with the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median_ms, write_json  # noqa: E402

from kernels import cpu_native  # noqa: E402
from kernels import torch_attention as ta  # noqa: E402

LENGTHS = (16, 32, 64, 128, 256, 512)
ROWS = 1 << 14


def time_form(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flash: bool) -> tuple[float, float]:
    """Median forward and backward ms of one ``[n, H, L, Dh]`` causal batch (``flash``: ATen's fused kernel)."""
    do = torch.randn_like(q)
    o, lse = ta.attend_fwd(q, k, v, 0.25, is_causal=True)
    ta._CPU_FLASH = flash
    try:
        fwd = median_ms(lambda: ta.attend_fwd(q, k, v, 0.25, is_causal=True), repeats=5)
        bwd = median_ms(lambda: ta.attend_bwd(do, q, k, v, o, lse, 0.25, is_causal=True), repeats=5)
    finally:
        ta._CPU_FLASH = True
    return fwd, bwd


def time_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
    """Median forward and backward ms of the native jagged kernels on the batch as n sequences of L rows."""
    n, h, length, dh = q.shape
    q, k, v = (x.transpose(1, 2).reshape(n * length, h, dh) for x in (q, k, v))  # [n*L, H, Dh] jagged rows
    offsets = torch.arange(n + 1) * length
    o, lse = cpu_native.jagged_fwd(q, k, v, offsets, None, 0.25)
    do = torch.randn_like(q)
    fwd = median_ms(lambda: cpu_native.jagged_fwd(q, k, v, offsets, None, 0.25), repeats=5)
    bwd = median_ms(lambda: cpu_native.jagged_bwd(do, q, k, v, o, lse, offsets, None, 0.25), repeats=5)
    return fwd, bwd


def forms(n: int, heads: int, length: int, dh: int) -> dict[str, float]:
    """Median ms of each form on one ``[n, H, L, Dh]`` causal batch."""
    out: dict[str, float] = {}
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        q, k, v = (torch.randn(n, heads, length, dh).to(dtype) for _ in range(3))
        for flash in ((True, False) if dtype == torch.float32 else (True,)):
            name = f"{'flash' if flash else 'explicit'}_{tag}"
            out[f"{name}_fwd_ms"], out[f"{name}_bwd_ms"] = time_form(q, k, v, flash)
        if dtype == torch.float32 and cpu_native.supports(q):
            out["native_fp32_fwd_ms"], out["native_fp32_bwd_ms"] = time_native(q, k, v)
    fwd_flops = 4 * n * heads * length * length * dh / 2
    for f in ("flash_fp32", "native_fp32"):
        if f"{f}_fwd_ms" in out:
            out[f"{f}_gflops_fwd_bwd"] = 3.5 * fwd_flops / ((out[f"{f}_fwd_ms"] + out[f"{f}_bwd_ms"]) * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dh", type=int, default=16)
    ap.add_argument("--heads", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    records = {length: forms(ROWS // length, args.heads, length, args.dh) for length in LENGTHS}
    names = [f for f in ("native_fp32", "flash_fp32", "explicit_fp32", "flash_bf16") if f"{f}_fwd_ms" in records[16]]
    rates = [f for f in ("native_fp32", "flash_fp32") if f in names]
    print("| L | " + " | ".join(f"{f.replace('_', ' ')} fwd / fwd+bwd ms" for f in names) + " | "
          + " | ".join(f"{f.replace('_', ' ')} GFLOP/s" for f in rates) + " |")
    print("|---:|" + "---:|" * (len(names) + len(rates)))
    for length, r in records.items():
        cells = [f"{r[f'{f}_fwd_ms']:.1f} / {r[f'{f}_fwd_ms'] + r[f'{f}_bwd_ms']:.1f}" for f in names]
        cells += [f"{r[f'{f}_gflops_fwd_bwd']:.1f}" for f in rates]
        print(f"| {length} | " + " | ".join(cells) + " |")
    print(f"load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    print(write_json("cpu_attention_forms", {"machine": machine(), "threads": args.threads, "dh": args.dh,
                                             "heads": args.heads, "rows": ROWS, "by_length": records,
                                             "load_before": load_before, "load_after": os.getloadavg()}))


if __name__ == "__main__":
    main()
