"""Training and scoring throughput of the ranker on the run's device, for the GPU validation run.

    python bench/gpu/model_throughput.py train --out train.json [--requests 256 --candidates 16 ...]
    python bench/gpu/model_throughput.py score --out score.json [--length 2048 --candidates 1024]

``train``: one AdamW step of the bench ranker of bench/train_throughput.py (d_model 128, 4 heads,
4 layers, linear pyramid) on random heavy-tailed batches; median step time -> candidates/s and
GFLOP/s (3 x forward matmul FLOPs of ``recsys.model.pyramid.batch_flops``). The full model
(tokenizer + embeddings + trunk) is tried first; its tokenizer runs torchrec's KeyedJaggedTensor
ops, which need FBGEMM kernels for the device. If that step raises, the error is recorded as
``full_model_error`` and the trunk alone is measured (``scope: "trunk"``: the same blocks and
heads trained from random S / NS tokens, embeddings and tokenizer left out; same FLOP count).

``score``: one request with an L-token history and C candidates, forward only: ``encode_prefix`` once
+ ``score_in_chunks`` (chunks of 256 candidates), i.e. the ``cached`` method of bench/kv_cache.py
and what the scoring job runs; random tokens (tokenization is not timed there either).

Attention backend: ``triton`` on CUDA, ``torch`` on CPU. Exit 0 with ``"skipped": "<why>"`` in the
JSON when the model cannot be imported (torchrec / FBGEMM missing). Last printed line: the JSON path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))  # train_throughput, kv_cache, common
sys.path.insert(0, str(BENCH.parent))  # repo root: recsys, kernels


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def import_model_stack() -> str | None:
    """None when the model's imports work, else why not (the first missing module and its error)."""
    try:
        import kv_cache  # noqa: F401  (recsys.model, recsys.serving: torchrec, fbgemm_gpu)
        import train_throughput  # noqa: F401
    except Exception as e:  # ImportError, or an OSError / RuntimeError from loading FBGEMM's libraries
        return f"cannot import the model stack: {type(e).__name__}: {e}"[:600]
    return None


def trunk_step(model, cfg, lengths: list[int], candidates: int, device: str):
    """One AdamW step of blocks + heads from random tokens (no tokenizer): what the trunk costs."""
    from recsys.data.jagged import lengths_to_offsets
    from recsys.features.tokenizer import TokenizedBatch
    from recsys.model.heads import multitask_bce

    g = torch.Generator().manual_seed(0)
    s_off = lengths_to_offsets(torch.tensor(lengths))
    c_off = lengths_to_offsets(torch.full((len(lengths),), candidates))
    tok = TokenizedBatch(torch.randn(int(s_off[-1]), cfg.d_model, generator=g).to(device), s_off.to(device),
                         torch.randn(int(c_off[-1]), model.tokenizer.n_ns, cfg.d_model, generator=g).to(device),
                         c_off.to(device))
    labels = torch.randint(0, 2, (int(c_off[-1]), len(model.tasks)), generator=g).float().to(device)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("tokenizer.")], lr=1e-3)

    def step() -> None:
        loss, _ = multitask_bce(model.rank(tok), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(device)

    return step


def train(args, device: str, backend: str) -> dict:
    from attention_sweep import matmul_gflops
    from train_throughput import batch_step, build_model, make_batch, step_record

    from recsys.model.config import PyramidConfig

    schema, lengths, batch = make_batch(args.requests, args.candidates, args.median_history, args.max_len)
    model, cfg = build_model(schema, PyramidConfig(mode="linear", final=0, round_to=32), args.max_len, backend, device)
    ceiling = matmul_gflops(torch.float32, device, sizes=(1024, 2048) if device == "cuda" else (256,), reps=3)
    out = {"batch": {"requests": args.requests, "candidates_per_request": args.candidates, "max_len": args.max_len,
                     "mean_history": sum(lengths) / len(lengths)}}
    if args.scope != "trunk":
        try:
            rec = step_record("pyramid_linear", model, cfg, batch_step(model, batch.to(device), device), lengths,
                              args.candidates, args.repeats, ceiling)
            return {**out, "scope": "full model", **rec}
        except Exception as e:  # torchrec ops without kernels for this device: measure the trunk instead
            if args.scope == "full":
                raise
            out["full_model_error"] = f"{type(e).__name__}: {e}"[:600]
    rec = step_record("pyramid_linear", model, cfg, trunk_step(model, cfg, lengths, args.candidates, device),
                      lengths, args.candidates, args.repeats, ceiling)
    return {**out, "scope": "trunk (blocks + heads from random tokens; tokenizer/embeddings not run)", **rec}


def score(args, device: str, backend: str) -> dict:
    from common import median_ms
    from kv_cache import CHUNK, N_NS, D, build

    from recsys.serving.scorer import score_in_chunks

    model = build(args.length, backend, device)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(args.length, D, generator=g).to(device)
    ns = torch.randn(args.candidates, N_NS, D, generator=g).to(device)
    s_off = torch.tensor([0, args.length], device=device)
    c_off = torch.tensor([0, args.candidates], device=device)

    @torch.no_grad()
    def cached() -> None:
        score_in_chunks(model, model.encode_prefix(s, s_off), ns, c_off, CHUNK)
        _sync(device)

    ms = median_ms(cached, repeats=args.repeats, warmup=1)
    return {"scope": "encode_prefix + score_in_chunks (the scoring job's path), one request, random tokens",
            "L": args.length, "C": args.candidates, "candidate_chunk": CHUNK, "pyramid": model.schedule.describe(),
            "ms_per_request_median": ms, "candidates_per_s": args.candidates / (ms / 1e3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["train", "score"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=256, help="train: requests per batch")
    ap.add_argument("--candidates", type=int, default=None, help="train: per request (16); score: C (1024)")
    ap.add_argument("--max-len", type=int, default=1024, help="train: max S tokens per request")
    ap.add_argument("--median-history", type=float, default=200.0, help="train: median S tokens")
    ap.add_argument("--length", type=int, default=2048, help="score: history tokens L")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scope", choices=["auto", "full", "trunk"], default="auto",
                    help="train: full model, trunk only, or full with the trunk as fallback (auto)")
    args = ap.parse_args()
    if args.candidates is None:
        args.candidates = 16 if args.what == "train" else 1024
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "triton" if device == "cuda" else "torch"
    result = {"what": args.what, "device": device, "attention_backend": backend,
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "loadavg_before": os.getloadavg()}
    why = import_model_stack()
    if why is not None:
        result["skipped"] = why
    else:
        try:
            result.update((train if args.what == "train" else score)(args, device, backend))
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"[:600]
            result["traceback_tail"] = traceback.format_exc()[-2000:]
    result["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "traceback_tail"}))
    print(args.out)
    sys.exit(1 if "error" in result else 0)


if __name__ == "__main__":
    main()
