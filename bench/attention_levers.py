"""Rotary and candidate-prefix own-token levers in isolation, old form vs new, interleaved medians.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python bench/attention_levers.py [--threads 1] [--rounds 7]

Shapes: one default training batch's NS side (`configs/model/small.yaml`): C = 4,096 candidates x N = 4
NS tokens, H = 4 heads, Dh = 16. ``rotary``: q, k, v of the NS projection, forward + backward, as two
``cat``-form calls and a contiguous v (`rotary_reference`, what the block did) vs one `rotary_parts` pass over the fused
qkv. ``own``: the candidate-prefix op's own-token part (scores, softmax, output; backward: dq, dk, dv),
as batched matmuls over ``[C, H, N, *]`` transposes (what the op did first), the broadcast multiply-sum
form (what it did next) and one fused causal call over C sequences of N (what it does now,
`kernels/torch_attention.py`). Results and the load average: ``bench/results/attention_levers.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

from kernels import torch_attention as ta  # noqa: E402
from recsys.model.block import rotary_parts, rotary_reference  # noqa: E402

C, N, H, DH = 4096, 4, 4, 16


def rotary_variants() -> dict:
    qkv = torch.randn(C, N, 3, H, DH, requires_grad=True)
    pos = torch.randint(0, 800, (C, N))
    grads = [torch.randn(C, N, H, DH) for _ in range(3)]

    def cat_form():  # v: the attention op made the unbound (strided) v contiguous
        flat = pos.reshape(-1)
        q, k = (rotary_reference(qkv[:, :, p].reshape(C * N, H, DH), flat).view(C, N, H, DH) for p in range(2))
        torch.autograd.backward([q, k, qkv[:, :, 2].contiguous()], grads)

    def fused():
        torch.autograd.backward(list(rotary_parts(qkv, pos, 2)), grads)

    return {"rotary_cat_form": cat_form, "rotary_fused": fused}


def own_matmul(q, k, v, dout, scale):
    """The own-token part as the op computed it before: batched matmuls on ``[C, H, N, *]``."""
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    s = (torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)) * scale).masked_fill(~causal, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])
    out = torch.matmul(p, v.transpose(1, 2))
    dof = dout.transpose(1, 2)
    ds = p * (torch.matmul(dof, v.permute(0, 2, 3, 1)) - (dof * out).sum(-1, keepdim=True))
    dq = (torch.matmul(ds, k.transpose(1, 2)) * scale).transpose(1, 2)
    dk = (torch.matmul(ds.transpose(-1, -2), q.transpose(1, 2)) * scale).transpose(1, 2)
    dv = torch.matmul(p.transpose(-1, -2), dof).transpose(1, 2)
    return out.transpose(1, 2), dq, dk, dv


def own_broadcast(q, k, v, dout, scale):
    """The broadcast multiply-sum form the op used next: ``[C, N_i, N_j, H]`` scores in the native layout."""
    causal = torch.ones(N, N, dtype=torch.bool).tril()[:, :, None]
    s = ((q[:, :, None] * k[:, None]).sum(-1) * scale).masked_fill(~causal, float("-inf"))
    lse = torch.logsumexp(s, 2)
    p = torch.exp(s - lse[:, :, None])
    out = (p[..., None] * v[:, None]).sum(2)
    ds = p * ((dout[:, :, None] * v[:, None]).sum(-1) - (dout * out).sum(-1)[:, :, None])
    return (out, (ds[..., None] * k[:, None]).sum(2) * scale, (ds[..., None] * q[:, :, None]).sum(1) * scale,
            (p[..., None] * dout[:, :, None]).sum(1))


def own_fused(q, k, v, dout, scale):
    """What the op does now: one fused causal call over C sequences of length N, forward and backward."""
    qt, kt, vt, dt = (x.transpose(1, 2) for x in (q, k, v, dout))
    out, lse = ta.attend_fwd(qt, kt, vt, scale, is_causal=True)
    dq, dk, dv = ta.attend_bwd(dt, qt, kt, vt, out, lse, scale, is_causal=True)
    return tuple(x.transpose(1, 2) for x in (out, dq, dk, dv))


def own_variants() -> dict:
    q, k, v, dout = (torch.randn(C, N, H, DH) for _ in range(4))
    forms = {"own_matmul": own_matmul, "own_broadcast": own_broadcast, "own_fused": own_fused}
    results = {name: form(q, k, v, dout, 0.25) for name, form in forms.items()}
    for name in ("own_broadcast", "own_fused"):
        err = max(float((x - y).abs().max()) for x, y in zip(results["own_matmul"], results[name]))
        print(f"{name} vs own_matmul: max abs diff {err:.2e}")
    return {name: (lambda form=form: form(q, k, v, dout, 0.25)) for name, form in forms.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = {**rotary_variants(), **own_variants()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    load_before = os.getloadavg()
    for fn in variants.values():
        fn()  # warm-up
    for r in range(args.rounds):
        items = list(variants.items())
        for name, fn in (items if r % 2 == 0 else items[::-1]):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:18s} {v:8.1f} ms")
    print(f"rotary speed-up {med['rotary_cat_form'] / med['rotary_fused']:.2f}x, own-token speed-up "
          f"broadcast {med['own_matmul'] / med['own_broadcast']:.2f}x, fused {med['own_matmul'] / med['own_fused']:.2f}x "
          f"over own_matmul; load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(write_json("attention_levers", {"machine": machine(), "threads": args.threads, "rounds": args.rounds,
                                          "median_ms": med, "load_before": load_before,
                                          "load_after": os.getloadavg()}))


if __name__ == "__main__":
    main()
