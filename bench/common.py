"""Shared helpers of the end-to-end benches: timing medians, the matmul ceiling, JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def median_ms(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds (quote medians: this machine is noisy)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def device_median_ms(fn: Callable[[], Any], device: str, repeats: int = 5) -> float:
    """Median milliseconds of ``fn()`` on ``device``: ``triton.testing.do_bench`` (CUDA events,
    L2 flushed between calls, warm-up included) on CUDA, :func:`median_ms` elsewhere."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return median_ms(fn, repeats=repeats)


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """Achievable dense matmul GFLOP/s on this machine and dtype (``2 n^3`` FLOPs per call):
    the ceiling every bench quotes beside its own GFLOP/s, measured in the same run."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    ms = median_ms(lambda: a @ b, repeats=repeats, warmup=2)
    return 2 * n**3 / (ms * 1e-3) / 1e9


def machine() -> dict[str, Any]:
    return {"device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine()}


def write_json(name: str, payload: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
