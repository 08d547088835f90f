"""Training throughput of the OneTrans ranker, with and without the pyramid, on CPU.

    .venv/bin/python bench/train_throughput.py [--quick]

For each configuration: median step time over random jagged batches with heavy-tailed
history lengths, candidates/s, and achieved GFLOP/s, next to the fp32 matmul GFLOP/s
measured in the same run. FLOPs per step = 3 x forward FLOPs (backward ~ 2 x forward);
forward FLOPs come from `recsys.model.pyramid.batch_flops` (matmuls only: projections,
attention QK^T and PV, FFN; embeddings, norms and softmax are not counted).
Last printed line: the JSON path.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-len", type=int, default=256, help="max S tokens per request")
    ap.add_argument("--requests", type=int, default=64, help="requests per batch")
    ap.add_argument("--candidates", type=int, default=16, help="candidates per request")
    ap.add_argument("--median-history", type=float, default=60.0, help="median S tokens (lognormal, sigma 1.2)")
    args = ap.parse_args()
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
