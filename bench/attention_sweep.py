"""Attention sweep: reference / torch / torch.compile / triton over sequence length, plus the
peak memory of jagged vs padded attention on skewed lengths.

    .venv/bin/python bench/attention_sweep.py            # L in 256 .. 8192
    .venv/bin/python bench/attention_sweep.py --quick    # L in {256, 1024}, fewer repeats

Workload: B = TOKENS / L sequences of length L (same token count at every L), H heads, head dim
Dh, full causal self-attention (``q_offsets=None``), ``--dtype`` (fp32 default).

FLOP formula (as in the Triton fused-attention tutorial):
    forward  = 4 * B * H * L * L * Dh * 0.5     (two matmuls of 2*L*L*Dh each; x0.5 for causal)
    fwd+bwd  = 3.5 * forward                    (backward = 2.5x forward: five matmuls, one recompute)
Ceiling: the machine's dense matmul GFLOP/s (n x n @ n x n, 2 n^3 FLOPs, best over n in
{512, 1024, 2048} x 9 runs), fp32 and bf16, measured in the same run with the same thread count.
Attention times are medians.

Providers:
- ``reference``     kernels.reference (fp32 loop over sequences; materialises [H, L, L] scores).
- ``torch``         backend="torch" (fbgemm padding + ATen CPU flash kernels, via the custom op).
- ``torch.compile`` torch.compile of the plain differentiable torch path (fbgemm pad -> SDPA
                    is_causal -> unpad); the custom op behind ``torch`` is opaque to the compiler,
                    so compiling the public call would only measure dispatch. Compile time reported.
- ``triton``        backend="triton" on CUDA only; skipped with the reason on CPU.

A provider is skipped at a length (recorded as ``"skipped: <reason>"``) when its projected time per
call (last measured time x FLOP ratio) exceeds ``--timeout``, or when the reference's score
matrices would exceed ``--mem-cap-gb``.

Candidates: forward time of ``candidate_prefix_attention`` (one request, prefix 1024, N = 8) for
C in {1, 16, 64, 256}, against jagged attention over C concatenated copies of [prefix ; own tokens].

Memory: peak bytes allocated by the CPU allocator during one call, measured with
``torch.profiler`` (``profile_memory=True``: running sum of the allocator's [memory] events),
above what was allocated before the call (inputs excluded). tracemalloc does not see torch's
allocator, so it is not used.

Writes JSON + PNG under bench/results/ (git-ignored); the last printed line is the JSON path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py

from common import device_median_ms  # noqa: E402

from kernels import candidate_prefix_attention, jagged_causal_attention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# timing helpers
# ----------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: str, reps: int, budget_s: float) -> tuple[float, int]:
    """Median seconds over up to ``reps`` calls after one warm-up (stops early past ``budget_s``)."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    spent = first
    while len(times) < reps and (not times or spent + times[-1] <= budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    if not times:
        times = [first]
    return statistics.median(times), len(times)


def matmul_gflops(dtype: torch.dtype, device: str, sizes=(512, 1024, 2048), reps: int = 9) -> float:
    """Best GFLOP/s over n x n matmuls, n in ``sizes``, best of ``reps`` each.

    A ceiling is a best case; on this shared 2-vCPU machine a 2-thread matmul varied from ~120 to
    ~220 GFLOP/s (fp32) between sizes and runs, so one size / the median would understate it.
    """
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        if device == "cuda":  # CUDA events (median of do_bench): host timers are too coarse there
            best = max(best, 2 * n**3 / (device_median_ms(lambda a=a, b=b: a @ b, device) * 1e-3) / 1e9)
            continue
        a @ b  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


# ----------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------
def _padded_slots(kv_offsets: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows [B, max_len]`` (the jagged row of every padded slot, clamped) and ``ok [B, max_len]`` (slot is real)."""
    j = torch.arange(max_len, device=kv_offsets.device)
    ok = j < kv_offsets.diff()[:, None]
    return (kv_offsets[:-1, None] + j).clamp_max(max(int(kv_offsets[-1]) - 1, 0)), ok


def padded_sdpa(q, k, v, kv_offsets, max_len: int):
    """Plain differentiable torch path for full causal attention (what torch.compile is given): every
    sequence padded to ``max_len`` by a row gather, SDPA, the real rows gathered back."""
    rows, ok = _padded_slots(kv_offsets, max_len)
    qp, kp, vp = ((x[rows] * ok[..., None, None]).transpose(1, 2) for x in (q, k, v))  # [B, H, L, Dh]
    o = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
    return o.transpose(1, 2)[ok]  # [sum L_i, H, Dh]


def make_provider(name: str, max_len: int):
    if name in ("reference", "torch", "triton"):
        return lambda q, k, v, off: jagged_causal_attention(q, k, v, off, backend=name)
    if name == "torch.compile":
        torch._dynamo.reset()  # fresh compile per (L, mode): avoids hitting the recompile limit
        compiled = torch.compile(padded_sdpa, dynamic=False)
        return lambda q, k, v, off: compiled(q, k, v, off, max_len)
    raise ValueError(name)


def run_case(provider, q, k, v, off, mode: str):
    def fn():
        if mode == "fwd":
            with torch.no_grad():
                return provider(q, k, v, off)
        out = provider(q, k, v, off)
        out.backward(torch.ones_like(out))
        return out

    return fn


def inputs(n_seq: int, length: int, heads: int, dh: int, dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows = n_seq * length
    q, k, v = (
        torch.randn(rows, heads, dh, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        for _ in range(3)
    )
    off = torch.arange(n_seq + 1, device=device) * length
    return q, k, v, off


# ----------------------------------------------------------------------------------------------
# memory: jagged vs padded on skewed lengths
# ----------------------------------------------------------------------------------------------
def peak_alloc_bytes(fn) -> int:
    """Peak CPU allocator bytes above the starting point during ``fn()`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def memory_section(heads: int, dh: int, long_len: int, short_len: int, n_short: int) -> dict:
    lengths = [long_len] + [short_len] * n_short
    gen = torch.Generator().manual_seed(0)
    rows = sum(lengths)
    q, k, v = (torch.randn(rows, heads, dh, generator=gen).requires_grad_() for _ in range(3))
    off = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    off[1:] = torch.tensor(lengths).cumsum(0)
    variants = {
        "jagged: torch backend (chunked per-chunk padding + flash)": lambda: jagged_causal_attention(
            q, k, v, off, backend="torch"
        ),
        "padded: pad all to max L, SDPA is_causal": lambda: padded_sdpa(q, k, v, off, long_len),
        "jagged: reference (per-sequence loop, materialised scores)": lambda: jagged_causal_attention(
            q, k, v, off, backend="reference"
        ),
    }
    result = {
        "lengths": f"1 x {long_len} + {n_short} x {short_len}",
        "heads": heads, "dh": dh, "dtype": "fp32",
        "method": "torch.profiler profile_memory: peak of the running sum of CPU allocator events during the call",
        "peak_mib": {},
    }
    for name, fn in variants.items():
        for mode in ("fwd", "fwd_bwd"):
            run = run_case(lambda *_a, fn=fn: fn(), q, k, v, off, mode)
            run()  # warm-up (one-time allocations, lazy init)
            q.grad = k.grad = v.grad = None
            peak = peak_alloc_bytes(run)
            q.grad = k.grad = v.grad = None
            result["peak_mib"][f"{name} [{mode}]"] = round(peak / 2**20, 1)
    return result


# ----------------------------------------------------------------------------------------------
# candidates: cost vs C with a shared prefix, vs the naive C copies of [prefix ; own tokens]
# ----------------------------------------------------------------------------------------------
def _candidate_variants(n_c: int, prefix: int, n_tok: int, heads: int, dh: int, device: str) -> dict:
    gen = torch.Generator().manual_seed(n_c)
    q, k, v = (torch.randn(n_c, n_tok, heads, dh, generator=gen).to(device) for _ in range(3))
    pk, pv = (torch.randn(prefix, heads, dh, generator=gen).to(device) for _ in range(2))
    p_off = torch.tensor([0, prefix], device=device)
    c_off = torch.tensor([0, n_c], device=device)
    # naive: each candidate as its own sequence [prefix ; own N tokens], last N positions query
    kk = torch.cat([pk.expand(n_c, -1, -1, -1), k], dim=1).reshape(-1, heads, dh)
    vv = torch.cat([pv.expand(n_c, -1, -1, -1), v], dim=1).reshape(-1, heads, dh)
    kv_off = torch.arange(n_c + 1, device=device) * (prefix + n_tok)
    q_off = torch.arange(n_c + 1, device=device) * n_tok
    return {
        "candidate_prefix torch": lambda: candidate_prefix_attention(q, k, v, pk, pv, p_off, c_off, backend="torch"),
        "candidate_prefix reference": lambda: candidate_prefix_attention(
            q, k, v, pk, pv, p_off, c_off, backend="reference"
        ),
        "jagged torch on C copies of [prefix; own]": lambda: jagged_causal_attention(
            q.reshape(-1, heads, dh), kk, vv, kv_off, q_off, backend="torch"
        ),
    }


def candidate_section(prefix: int, n_tok: int, heads: int, dh: int, counts: list[int], device: str, reps: int):
    """Forward time of candidate_prefix_attention vs jagged attention over C concatenated copies."""
    rows = []
    for n_c in counts:
        for name, fn in _candidate_variants(n_c, prefix, n_tok, heads, dh, device).items():
            with torch.no_grad():
                sec, _ = time_call(fn, device, reps, budget_s=30.0)
            row = {"C": n_c, "variant": name, "ms": round(sec * 1e3, 3), "ms_per_candidate": round(sec * 1e3 / n_c, 4)}
            print(f"candidates C={n_c:4d} {name:42s} {row['ms']:9.2f} ms  ({row['ms_per_candidate']:.3f} ms/cand)", flush=True)
            rows.append(row)
    return {"prefix": prefix, "n_tok": n_tok, "heads": heads, "dh": dh, "dtype": "fp32", "mode": "fwd", "rows": rows}


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="L in {256, 1024}, 3 repeats")
    ap.add_argument("--tokens", type=int, default=8192, help="B * L, constant over the sweep")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dh", type=int, default=32)
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--timeout", type=float, default=20.0, help="max projected seconds per call per provider")
    ap.add_argument("--mem-cap-gb", type=float, default=2.0, help="skip reference beyond this score memory")
    ap.add_argument("--providers", default="reference,torch,torch.compile,triton")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    lengths = [256, 1024] if args.quick else [256, 512, 1024, 2048, 4096, 8192]
    reps = 3 if args.quick else 5
    providers = args.providers.split(",")

    load_before = os.getloadavg()
    ceiling = {
        "fp32_matmul_gflops": round(matmul_gflops(torch.float32, device), 1),
        "bf16_matmul_gflops": round(matmul_gflops(torch.bfloat16, device), 1),
    }
    print(f"device={device} threads={torch.get_num_threads()} load={load_before} ceiling={ceiling}", flush=True)

    rows = []
    last: dict[tuple[str, str], tuple[int, float]] = {}  # (provider, mode) -> (flops, seconds)
    for length in lengths:
        n_seq = max(1, args.tokens // length)
        fwd_flops = 4 * n_seq * args.heads * length * length * args.dh * 0.5
        for provider in providers:
            for mode in ("fwd", "fwd_bwd"):
                flops = fwd_flops * (3.5 if mode == "fwd_bwd" else 1.0)
                row = {"L": length, "B": n_seq, "provider": provider, "mode": mode, "gflop": flops / 1e9}
                reason = None
                if provider == "triton" and device != "cuda":
                    reason = "no CUDA device: Triton kernels need a GPU (the interpreter is a correctness tool)"
                elif provider == "reference":
                    score_gb = args.heads * length * length * 4 * (2 if mode == "fwd" else 4) / 1e9
                    if score_gb > args.mem_cap_gb:
                        reason = f"~{score_gb:.1f} GB of fp32 score matrices per sequence > --mem-cap-gb {args.mem_cap_gb}"
                if reason is None and (provider, mode) in last:
                    prev_flops, prev_s = last[provider, mode]
                    projected = prev_s * flops / prev_flops
                    if projected > args.timeout:
                        reason = f"projected {projected:.1f} s per call > --timeout {args.timeout} s"
                if reason is not None:
                    row["skipped"] = reason
                    print(f"L={length:5d} {provider:14s} {mode:7s} skipped: {reason}", flush=True)
                    rows.append(row)
                    continue
                q, k, v, off = inputs(n_seq, length, args.heads, args.dh, dtype, device)
                t0 = time.perf_counter()
                fn = run_case(make_provider(provider, length), q, k, v, off, mode)
                if provider == "torch.compile":
                    fn()  # compile (and first run)
                    _sync(device)
                    row["compile_s"] = round(time.perf_counter() - t0, 1)
                sec, n = time_call(fn, device, reps, budget_s=max(args.timeout, 1.0) * 3)
                last[provider, mode] = (flops, sec)
                row.update(ms=round(sec * 1e3, 3), reps=n, gflops=round(flops / sec / 1e9, 2))
                print(
                    f"L={length:5d} {provider:14s} {mode:7s} {row['ms']:10.2f} ms  {row['gflops']:8.2f} GFLOP/s"
                    + (f"  (compile {row['compile_s']} s)" if "compile_s" in row else ""),
                    flush=True,
                )
                rows.append(row)
                del q, k, v, fn

    candidates = candidate_section(
        prefix=1024, n_tok=8, heads=args.heads, dh=args.dh,
        counts=[1, 64] if args.quick else [1, 16, 64, 256], device=device, reps=reps,
    )
    memory = memory_section(args.heads, args.dh, long_len=1024 if args.quick else 4096, short_len=64, n_short=63)
    for name, mib in memory["peak_mib"].items():
        print(f"memory {name}: {mib} MiB", flush=True)

    result = {
        "when": datetime.now().isoformat(timespec="seconds"),
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "torch": torch.__version__,
        "config": vars(args),
        "flop_formula": "fwd = 4*B*H*L*L*Dh*0.5 (causal); fwd_bwd = 3.5 * fwd",
        "ceiling": ceiling,
        "sweep": rows,
        "candidates": candidates,
        "memory_skewed": memory,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"attention_sweep_{datetime.now():%Y%m%d-%H%M%S}"
    json_path = RESULTS / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / f"{stem}.png")
    print(json_path)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, mode in zip(axes, ("fwd", "fwd_bwd")):
        for provider in sorted({r["provider"] for r in result["sweep"]}):
            pts = [(r["L"], r["gflops"]) for r in result["sweep"] if r["provider"] == provider and r["mode"] == mode and "gflops" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=provider)
        key = "bf16" if result["config"]["dtype"] == "bf16" else "fp32"
        ax.axhline(result["ceiling"][f"{key}_matmul_gflops"], ls="--", c="gray", label=f"{key} matmul ceiling")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L")
        ax.set_title(f"causal attention {mode} ({result['config']['dtype']}, {result['device']}, {result['threads']} threads)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GFLOP/s")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
