"""Per-request time and peak memory vs history length L: full attention, window, window + VQ memory,
window + search.

    .venv/bin/python bench/long_sequence.py [--quick] [--lengths 1024 4096 16384 65536] [--threads N]

One request with one behaviour kind of ``L`` events and ``C`` candidates (default 16), scored with
no grad (the scoring path: tokenizer + ``encode_prefix`` + ``score_candidates``; collation of the
Parquet row is not timed). Model: d_model=64, 4 heads, 3 layers, FFN 4x, 4 NS tokens, emb 32,
linear pyramid (round_to 32), attention backend "torch" (CPU), fp32, random weights.

Variants (S tokens = what goes through the Transformer):

* ``full``: all L events are S tokens (O(L^2) attention); only up to ``--full-max`` (default 16k:
  at 64k one forward takes minutes on 2 cores; recorded as skipped, with the reason).
* ``window``: the last W = ``--window`` events only (the others are dropped).
* ``window_memory``: window + VQ memory NS token (M = 64 codes). The user's memory state is cached
  (as the S-token K/V are): a request appends the one event that left the window (``VQMemory.append``,
  O(1)) and reads the state (O(M) per candidate); the long history itself is not read. The one-off
  cost of building the state from all L events is reported separately (``memory_build_ms``).
* ``window_hard`` / ``window_soft``: window + hard (same category, most recent first) / soft
  (top-K inner product in the decoupled space) search over all L events, K = 64, target
  attention, one NS token. O(L) per request (the search reads the whole history).

Peak memory: the process's resident-set high-water mark during the timed call minus the RSS before
it (Linux: ``/proc/self/clear_refs`` resets the mark; ``VmHWM`` is read after), in MiB. It includes
allocator effects, so small values are noisy. Beside the timings: the fp32 matmul GFLOP/s measured
in the same run (context for how loaded the machine was).

Target (issue 7): ``window_memory`` time at 64k <= 2 x its time at 4k. JSON + PNG under
``bench/results/``; the last printed line is the JSON path.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, matmul_gflops, median_ms, write_json  # noqa: E402

from recsys.data.collate import collate  # noqa: E402
from recsys.data.schema import DataSchema  # noqa: E402
from recsys.model.config import ModelConfig, PyramidConfig  # noqa: E402
from recsys.model.ranker import OneTransRanker  # noqa: E402

SCHEMA = DataSchema(sparse=[], dense=[], sequences=["click"], tasks=["click"], num_items=100_001,
                    num_categories=101, num_actions=8)


def request_table(length: int, n_cand: int, seed: int = 0) -> pa.Table:
    """One request row with ``length`` click events (sticky categories) and ``n_cand`` candidates."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(1, SCHEMA.num_categories, length)
    data = {"request_id": [0], "user_id": [0], "request_ts": [10**10],
            "seq_click_item_id": [rng.integers(1, SCHEMA.num_items, length).tolist()],
            "seq_click_category": [cat.tolist()],
            "seq_click_action": [rng.integers(1, SCHEMA.num_actions, length).tolist()],
            "seq_click_ts": [np.sort(rng.integers(0, 10**9, length)).tolist()],
            "cand_item_id": [rng.integers(1, SCHEMA.num_items, n_cand).tolist()],
            "cand_category": [rng.integers(1, SCHEMA.num_categories, n_cand).tolist()],
            "cand_label_click": [[0.0] * n_cand]}
    return pa.Table.from_pydict(data, schema=SCHEMA.arrow_schema())


def make_model(max_s: int, long_seq: dict | None = None) -> OneTransRanker:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_heads=4, n_layers=3, ffn_mult=4, n_ns_tokens=4, emb_dim=32, head_hidden=64,
                      pyramid=PyramidConfig(mode="linear", final=0, round_to=32), attention_backend="torch",
                      long_seq=long_seq or {})
    return OneTransRanker(SCHEMA, cfg, max_s_tokens=max_s).eval()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_mib(fn) -> float | None:
    """Resident-set high-water mark during ``fn()`` minus the RSS before it (MiB); None off Linux."""
    try:
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    fn()
    return max(0, _status_kib("VmHWM") - before) / 1024


def score(model: OneTransRanker, batch, memory=None) -> torch.Tensor:
    with torch.no_grad():
        return model.rank(model.tokenizer(batch, memory=memory))


def memory_request(model: OneTransRanker, state, leaving: torch.Tensor, batch) -> torch.Tensor:
    """One request of a user with a cached memory state: O(1) append of the event that left the window,
    then the window's S tokens + the O(M) memory read."""
    with torch.no_grad():
        st = model.tokenizer.long.memory.append(state, leaving)
        return model.rank(model.tokenizer(batch, memory=st))


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # Every allocation >= 64 KiB gets its own mapping, returned to the OS on free, so the RSS
        # high-water mark sees each call's large tensors (glibc's adaptive threshold would recycle them).
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--full-max", type=int, default=16384, help="longest L run with full attention")
    ap.add_argument("--codebook", type=int, default=64)
    ap.add_argument("--search-k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="L in {1k, 4k}, 3 repeats (smoke run)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.lengths, args.repeats, args.full_max = [1024, 4096], 3, 1024
    w, c = args.window, args.candidates
    models = {
        "window": make_model(w),
        "window_memory": make_model(w, {"memory": True, "codebook_size": args.codebook}),
        "window_hard": make_model(w, {"search": "hard", "search_k": args.search_k}),
        "window_soft": make_model(w, {"search": "soft", "search_k": args.search_k}),
    }
    records = []
    gflops = matmul_gflops()
    print(f"fp32 matmul: {gflops:.1f} GFLOP/s, threads={torch.get_num_threads()}", flush=True)
    for length in args.lengths:
        table = request_table(length, c, seed=length)
        full_batch = collate(table, SCHEMA, length)
        win_batch = collate(table, SCHEMA, w, long_max_len=max(w, length))  # window + the whole long history
        win_only = collate(table, SCHEMA, w, long_max_len=w)  # window; long_seq = the window (no old events)

        rec: dict = {"L": length, "window": w, "candidates": c}
        runs = {
            "window": functools.partial(score, models["window"], win_only),
            "window_hard": functools.partial(score, models["window_hard"], win_batch),
            "window_soft": functools.partial(score, models["window_soft"], win_batch),
        }
        mem_model = models["window_memory"]
        with torch.no_grad():
            t0 = time.perf_counter()
            state = mem_model.tokenizer.long_memory_state(win_batch)  # the one-off O(L) build
            rec["memory_build_ms"] = (time.perf_counter() - t0) * 1e3
            leaving = mem_model.tokenizer.long_event_features(win_batch.long_seq)[:1]  # stands in for the event leaving the window
        rec["memory_state_bytes"] = state.nbytes

        runs["window_memory"] = functools.partial(memory_request, mem_model, state, leaving, win_only)
        if length <= args.full_max:
            runs["full"] = functools.partial(score, make_model(length), full_batch)
        else:
            rec["full_skipped"] = f"L={length} > --full-max={args.full_max} (O(L^2): minutes per request here)"
        for name, fn in runs.items():
            reps = args.repeats if not (name == "full" and length > 4096) else max(1, args.repeats // 2)
            rec[f"{name}_ms"] = median_ms(fn, repeats=reps, warmup=1)
            rec[f"{name}_peak_mib"] = peak_mib(fn)
            print(f"L={length:>6} {name:<14} {rec[f'{name}_ms']:9.2f} ms  peak {rec[f'{name}_peak_mib']} MiB", flush=True)
        records.append(rec)

    by_len = {r["L"]: r for r in records}
    target = None
    if 4096 in by_len and 65536 in by_len:
        ratio = by_len[65536]["window_memory_ms"] / by_len[4096]["window_memory_ms"]
        target = {"window_memory_64k_over_4k": ratio, "met": ratio <= 2.0}
        print(f"target: window_memory 64k / 4k = {ratio:.2f} (<= 2: {'met' if ratio <= 2 else 'NOT met'})")
    payload = {"bench": "long_sequence", "machine": machine(), "matmul_gflops": gflops,
               "args": vars(args), "records": records, "target": target}
    path = write_json("long_sequence", payload)
    plot(records, path.with_suffix(".png"))
    print(path)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("full", "window", "window_memory", "window_hard", "window_soft"):
        pts = [(r["L"], r[f"{name}_ms"], r[f"{name}_peak_mib"]) for r in records if f"{name}_ms" in r]
        if not pts:
            continue
        ls, ms, mib = zip(*pts)
        axes[0].plot(ls, ms, marker="o", label=name)
        axes[1].plot(ls, [m or 0.0 for m in mib], marker="o", label=name)
    for ax, ylabel in zip(axes, ("median time per request (ms)", "peak RSS increase (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog" if "MiB" in ylabel else "log")
        ax.set_xlabel("history length L (events)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[1].set_ylim(bottom=0)
    axes[0].legend()
    fig.suptitle("one request, 16 candidates, window W=256 (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
