"""Scoring C candidates of one request with an L-token history: naive vs one-pass mask vs KV-cached.

    .venv/bin/python bench/kv_cache.py [--quick] [--threads N]

Model: d_model=128, 4 heads, 4 layers, FFN 4x, N=4 NS tokens, linear pyramid (round_to 32) sized for
the history, fp32, attention backend "torch" (CPU). Inputs are random S / NS tokens (tokenization is
not timed: it is the same for every method). One request, forward only, no grad.

Methods (all give the same logits; the max |difference| to ``cached`` is recorded):

* ``naive``: every candidate alone through ``[S ; its NS]`` (``OneTransRanker.rank_per_candidate``,
  jagged-batched over the timed candidates: C full passes). Too slow at large ``L x C``: only
  ``c_timed = min(C, max(1, 16384 // L))`` candidates are timed and the time is scaled by
  ``C / c_timed`` (``naive_extrapolated`` says so in the record).
* ``onepass``: one sequence ``[S ; NS_1 ; ... ; NS_C]`` per layer with a target-aware boolean mask (S
  token sees earlier S tokens; NS token i of candidate c sees all S tokens and NS tokens ``<= i`` of c),
  one dense masked ``scaled_dot_product_attention`` over the whole sequence (query rows in blocks of
  1024 to bound memory). No tile skipping: the masked candidate-by-candidate scores are computed.
* ``cached``: ``encode_prefix`` once + ``score_candidates`` in chunks of 256 candidates
  (``recsys.serving.scorer.score_in_chunks``): what the scoring job runs.
* ``lower_bound``: ``encode_prefix`` alone + ``score_candidates`` of all C on a precomputed prefix,
  timed separately and added: the cost of the two stages with no composition overhead.

FLOPs: ``recsys.model.pyramid.batch_flops`` (matmuls of the shared-prefix computation: projections,
QK^T and PV, FFN; norms/softmax not counted). Every method's GFLOP/s is *useful* work (that FLOP count)
per second, so naive and onepass show how much of the machine they waste; beside it, the fp32 matmul
GFLOP/s measured in the same run. ``flop_speedup_bound = C * flops(L, 1) / flops(L, C)`` is the
speedup naive -> cached would have at equal GFLOP/s (it ignores naive's extra top-layer S queries). Targets (reported, met or not): cached >= 0.5 x C faster than naive
for L >= 1024 and C <= 512; cached <= 1.25 x lower_bound. Last printed line: the JSON path.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, matmul_gflops, median_ms, write_json  # noqa: E402

from recsys.features.tokenizer import TokenizedBatch  # noqa: E402
from recsys.model.config import ModelConfig, PyramidConfig  # noqa: E402
from recsys.model.pyramid import batch_flops  # noqa: E402
from recsys.model.ranker import OneTransRanker  # noqa: E402
from recsys.serving.scorer import score_in_chunks  # noqa: E402
from recsys.testing import tiny_schema  # noqa: E402

D, HEADS, LAYERS, N_NS, CHUNK = 128, 4, 4, 4, 256
NAIVE_TOKENS = 16384  # history tokens per timed naive call (c_timed * L)


def build(max_s: int, backend: str = "torch", device: str = "cpu") -> OneTransRanker:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=D, n_heads=HEADS, n_layers=LAYERS, ffn_mult=4, n_ns_tokens=N_NS, emb_dim=32,
                      head_hidden=128, pyramid=PyramidConfig(mode="linear", final=0, round_to=32),
                      attention_backend=backend)
    return OneTransRanker(tiny_schema(kinds=("click",)), cfg, max_s_tokens=max_s).eval().to(device)


@torch.no_grad()
def onepass(model: OneTransRanker, s: torch.Tensor, ns: torch.Tensor, block_rows: int = 1024) -> torch.Tensor:
    """Logits ``[C, T]`` from one masked pass per layer over ``[S (L rows) ; NS (C*N rows)]``."""
    c, n = ns.shape[:2]
    x_s, x_n, n_s = s, ns, s.shape[0]
    length = s.shape[0]
    pos_n = torch.full((c, 1), length) + torch.arange(n)  # NS tokens follow the S tokens
    for layer, blk in enumerate(model.blocks):
        n_q = min(n_s, model.schedule.budget(layer))
        keep = torch.arange(n_s - n_q, n_s)
        pos_s = torch.arange(length - n_s, length)  # surviving S rows are the most recent ones
        q_s, k_s, v_s = blk.s_project(x_s, keep, pos_s)  # [n_q, H, Dh], [n_s, H, Dh]
        q_n, k_n, v_n = blk.ns_project(x_n, pos_n)  # [C, N, H, Dh]
        k = torch.cat([k_s, k_n.flatten(0, 1)]).transpose(0, 1)[None]  # [1, H, T, Dh], T = n_s + C*N
        v = torch.cat([v_s, v_n.flatten(0, 1)]).transpose(0, 1)[None]
        q = torch.cat([q_s, q_n.flatten(0, 1)])  # [n_q + C*N, H, Dh]
        t = torch.arange(n_s + c * n)
        col_s = t < n_s
        col_cand = torch.div(t - n_s, n, rounding_mode="floor")  # candidate of an NS key (junk for S keys)
        col_tok = (t - n_s) % n
        out = torch.empty_like(q)
        for r0 in range(0, q.shape[0], block_rows):
            rows = torch.arange(r0, min(q.shape[0], r0 + block_rows))
            is_s = rows < n_q
            s_pos = n_s - n_q + rows  # absolute position of an S query
            cand, tok = torch.div(rows - n_q, n, rounding_mode="floor"), (rows - n_q) % n
            see_s = col_s[None, :] & (t[None, :] <= s_pos[:, None])  # S rows: causal over S only
            see_n = col_s[None, :] | ((col_cand[None, :] == cand[:, None]) & (col_tok[None, :] <= tok[:, None]))
            mask = torch.where(is_s[:, None], see_s, see_n)  # [rows, T]
            o = F.scaled_dot_product_attention(q[rows].transpose(0, 1)[None], k, v, attn_mask=mask[None, None])
            out[rows] = o[0].transpose(0, 1)
        x_s = blk.s_finish(x_s[keep], out[:n_q]) if n_q else x_s[keep]
        x_n = blk.ns_finish(x_n, out[n_q:].view(c, n, *out.shape[1:]))
        n_s = n_q
    return model.heads(x_n)


def run_case(length: int, n_cand: int, repeats: int, ceiling: float) -> dict:
    model = build(length)
    g = torch.Generator().manual_seed(length * 7919 + n_cand)
    s = torch.randn(length, D, generator=g)
    ns = torch.randn(n_cand, N_NS, D, generator=g)
    s_off = torch.tensor([0, length])
    c_off = torch.tensor([0, n_cand])

    def cached() -> torch.Tensor:
        return score_in_chunks(model, model.encode_prefix(s, s_off), ns, c_off, CHUNK)

    prefix = model.encode_prefix(s, s_off)
    with torch.no_grad():
        ref = cached()
        cached_ms = median_ms(cached, repeats=repeats)
        user_ms = median_ms(lambda: model.encode_prefix(s, s_off), repeats=repeats)
        cand_ms = median_ms(lambda: model.score_candidates(prefix, ns, c_off), repeats=repeats)
        one = onepass(model, s, ns)
        onepass_ms = median_ms(lambda: onepass(model, s, ns), repeats=max(1, repeats - 2))
        c_timed = min(n_cand, max(1, NAIVE_TOKENS // length))
        tok = TokenizedBatch(s, s_off, ns[:c_timed], torch.tensor([0, c_timed]))
        naive_out = model.rank_per_candidate(tok)
        naive_ms = median_ms(lambda: model.rank_per_candidate(tok), repeats=max(1, repeats - 2)) * n_cand / c_timed
    flops = batch_flops(model.schedule, [length], [n_cand], N_NS, D, 4 * D)
    one_cand = batch_flops(model.schedule, [length], [1], N_NS, D, 4 * D)  # one naive full pass (approx.)
    lower_ms = user_ms + cand_ms

    def gf(ms: float) -> float:
        return flops / (ms * 1e-3) / 1e9

    return {
        "L": length, "C": n_cand, "pyramid": model.schedule.describe(),
        "naive_ms": naive_ms, "onepass_ms": onepass_ms, "cached_ms": cached_ms, "lower_bound_ms": lower_ms,
        "user_pass_ms": user_ms, "candidate_passes_ms": cand_ms,
        "naive_timed_candidates": c_timed, "naive_extrapolated": c_timed < n_cand,
        "speedup_vs_naive": naive_ms / cached_ms, "speedup_vs_onepass": onepass_ms / cached_ms,
        "cached_over_lower_bound": cached_ms / lower_ms,
        "flop_speedup_bound": n_cand * one_cand / flops,  # naive/cached FLOPs: the speedup at equal GFLOP/s
        "gflop": flops / 1e9, "cached_gflops": gf(cached_ms), "onepass_gflops": gf(onepass_ms),
        "naive_gflops": gf(naive_ms), "lower_bound_gflops": gf(lower_ms), "matmul_fp32_gflops": ceiling,
        "max_abs_diff_onepass": float((one - ref).abs().max()),
        "max_abs_diff_naive": float((naive_out - ref[:c_timed]).abs().max()),
        "target_speedup_applies": length >= 1024 and n_cand <= 512,
        "target_speedup_met": (naive_ms / cached_ms >= 0.5 * n_cand) if length >= 1024 and n_cand <= 512 else None,
        "target_lower_bound_met": cached_ms <= 1.25 * lower_ms,
    }


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["L"] for r in records})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        rs = sorted((r for r in records if r["L"] == length), key=lambda r: r["C"])
        cs = [r["C"] for r in rs]
        for key, style in (("naive_ms", "o-"), ("onepass_ms", "s-"), ("cached_ms", "^-"), ("lower_bound_ms", "k--")):
            ax.plot(cs, [r[key] for r in rs], style, label=key.replace("_ms", ""))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("candidates C")
        ax.set_ylabel("ms per request")
        ax.set_title(f"L = {length}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("one request, d=128, 4 layers, 4 heads, N=4, linear pyramid, fp32 CPU (naive partly extrapolated)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="L in {256, 1024}, C in {16, 256}, fewer repeats")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths, cands, repeats = ((256, 1024), (16, 256), 3) if args.quick else ((256, 1024, 4096), (16, 256, 1024), 5)
    ceiling = matmul_gflops(torch.float32)
    records = []
    print(f"{'L':>5} {'C':>5} {'naive ms':>11} {'onepass ms':>11} {'cached ms':>10} {'lower ms':>9} "
          f"{'x naive':>8} {'x 1pass':>8} {'c/lb':>5} {'GFLOP/s':>8}  (fp32 matmul {ceiling:.0f} GFLOP/s)")
    for length in lengths:
        for n_cand in cands:
            r = run_case(length, n_cand, repeats, ceiling)
            records.append(r)
            star = "*" if r["naive_extrapolated"] else " "
            print(f"{length:5d} {n_cand:5d} {r['naive_ms']:10.1f}{star} {r['onepass_ms']:11.1f} {r['cached_ms']:10.1f} "
                  f"{r['lower_bound_ms']:9.1f} {r['speedup_vs_naive']:8.1f} {r['speedup_vs_onepass']:8.2f} "
                  f"{r['cached_over_lower_bound']:5.2f} {r['cached_gflops']:8.1f}", flush=True)
    print("* naive extrapolated linearly from naive_timed_candidates")
    applies = [r for r in records if r["target_speedup_applies"]]
    met_speed = all(r["target_speedup_met"] for r in applies) if applies else None
    met_lb = all(r["target_lower_bound_met"] for r in records)
    print(f"target cached >= 0.5*C x naive (L>=1024, C<=512): {'met' if met_speed else 'NOT met'} "
          f"({sum(bool(r['target_speedup_met']) for r in applies)}/{len(applies)} cases)")
    print(f"target cached <= 1.25 x lower bound: {'met' if met_lb else 'NOT met'} "
          f"({sum(r['target_lower_bound_met'] for r in records)}/{len(records)} cases)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / "kv_cache.png"
    plot(records, png)
    if not all(math.isfinite(r["cached_ms"]) for r in records):
        raise RuntimeError("non-finite timing")
    meta = {"machine": {**machine(), "loadavg": list(os.getloadavg())}, "quick": args.quick, "plot": str(png),
            "model": {"d_model": D, "heads": HEADS, "layers": LAYERS, "n_ns": N_NS, "ffn": 4 * D,
                      "candidate_chunk": CHUNK, "pyramid": "linear, round_to 32, sized per L"}}
    payload = [{**r, **meta} for r in records]  # a list of records, each self-describing
    print(write_json("kv_cache", payload))


if __name__ == "__main__":
    main()
