"""Both attention ops against torch SDPA (flash backend) over sequence length, in TFLOP/s.

    python bench/gpu/attention_vs_sdpa.py --out sweep.json                 # CUDA: triton vs sdpa_flash
    python bench/gpu/attention_vs_sdpa.py --out sweep.json --lengths 128,256 --tokens 512 \
        --heads 2 --dh 32 --candidates 8 --ns-tokens 4                     # CPU: torch vs sdpa_flash

Workloads (``--dtype`` bf16 by default; inputs ~N(0, 1)):

- ``jagged``: ``jagged_causal_attention`` on B = ``--tokens`` / L sequences of length L, full causal
  self-attention. SDPA: the same rows viewed as ``[B, H, L, Dh]``, ``is_causal=True``.
- ``candidates``: ``candidate_prefix_attention``, B = ``--tokens`` / L requests, each a prefix of L
  tokens and C = ``--candidates`` candidates of N = ``--ns-tokens`` tokens. SDPA: C materialised
  copies per request of ``[prefix ; own N tokens]`` (keys) with the N own tokens as queries and a
  lower-right causal mask (``causal_lower_right``): the same outputs, with the prefix read C times.

Providers: ``triton`` (``backend="triton"``, CUDA only) or ``torch`` (``backend="torch"``, CPU), and
``sdpa_flash`` (``F.scaled_dot_product_attention`` under ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``).

FLOPs (useful work, the same count for every provider of an op; see bench/kernels/README.md):
    jagged      fwd = 4 * B * H * L * L * Dh * 0.5                  (QK^T and PV; x0.5 for causal)
    candidates  fwd = 4 * B * H * Dh * C * (N * L + N * (N + 1) / 2)
    fwd_bwd = 3.5 * fwd                                             (backward = 2.5 x forward)
Times: medians (``triton.testing.do_bench`` on CUDA, host-timer medians on CPU); ``first_call_s``
is the first call alone (Triton autotuning and compilation included). Ceiling: the bf16 (and fp32)
dense matmul TFLOP/s measured in the same run. Every (op, L) also records the provider-vs-SDPA
max abs difference of the output and the gradients, relative to max |SDPA|. The JSON is rewritten
after every row, so a run cut short by a timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: attention_sweep, common
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root: kernels

from attention_sweep import DTYPES, inputs, matmul_gflops  # noqa: E402
from common import device_median_ms  # noqa: E402

from kernels import candidate_prefix_attention, jagged_causal_attention  # noqa: E402

FLOP_FORMULA = {
    "jagged": "fwd = 4*B*H*L*L*Dh*0.5 (causal); fwd_bwd = 3.5*fwd",
    "candidates": "fwd = 4*B*H*Dh*C*(N*L + N*(N+1)/2); fwd_bwd = 3.5*fwd",
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, **kw)


# ----------------------------------------------------------------------------------------------
# workloads: inputs, the op call per provider, FLOPs
# ----------------------------------------------------------------------------------------------
def jagged_case(length: int, args, device: str, dtype: torch.dtype) -> dict:
    n_seq = max(1, args.tokens // length)
    q, k, v, off = inputs(n_seq, length, args.heads, args.dh, dtype, device)

    def padded(t: torch.Tensor) -> torch.Tensor:  # [B*L, H, Dh] -> [B, H, L, Dh] view (uniform lengths)
        return t.view(n_seq, length, args.heads, args.dh).transpose(1, 2)

    def ours(backend: str):
        return lambda: jagged_causal_attention(q, k, v, off, backend=backend)

    def sdpa():
        out = _sdpa(padded(q), padded(k), padded(v), is_causal=True)
        return out.transpose(1, 2).reshape(-1, args.heads, args.dh)

    def compare(out, g, ref, g_ref) -> dict:  # same layout for both providers
        return {"out": max_rel_diff(out, ref), **{n: max_rel_diff(a, b) for n, a, b in zip(("dq", "dk", "dv"), g, g_ref)}}

    fwd = 4 * n_seq * args.heads * length * length * args.dh * 0.5
    return {"shape": {"B": n_seq, "L": length}, "leaves": (q, k, v), "sdpa_leaves": (q, k, v), "ours": ours,
            "sdpa": sdpa, "compare": compare, "fwd_flops": fwd}


def candidates_case(length: int, args, device: str, dtype: torch.dtype) -> dict:
    n_req, n_c, n_tok, h, d = max(1, args.tokens // length), args.candidates, args.ns_tokens, args.heads, args.dh
    gen = torch.Generator().manual_seed(length)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    q, k, v = (leaf(n_req * n_c, n_tok, h, d) for _ in range(3))
    pk, pv = (leaf(n_req * length, h, d) for _ in range(2))
    p_off = torch.arange(n_req + 1, device=device) * length
    c_off = torch.arange(n_req + 1, device=device) * n_c
    # SDPA: per candidate, keys [its request's prefix ; its own N tokens] (copies, made once, not timed)
    with torch.no_grad():
        def copies(prefix: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
            pre = prefix.view(n_req, 1, length, h, d).expand(n_req, n_c, length, h, d).reshape(-1, length, h, d)
            return torch.cat([pre, own], dim=1).transpose(1, 2).contiguous()  # [B*C, H, L+N, Dh]

        kk, vv = copies(pk, k).requires_grad_(), copies(pv, v).requires_grad_()
    qq = q.detach().transpose(1, 2).contiguous().requires_grad_()  # [B*C, H, N, Dh]
    mask = causal_lower_right(n_tok, length + n_tok)

    def ours(backend: str):
        return lambda: candidate_prefix_attention(q, k, v, pk, pv, p_off, c_off, backend=backend)

    def sdpa():
        return _sdpa(qq, kk, vv, attn_mask=mask).transpose(1, 2)  # [B*C, N, H, Dh], like ours

    def compare(out, g, ref, g_ref) -> dict:
        """SDPA's copy gradients back to our layout: own-token keys as they are, prefix keys summed over C."""
        dqq, dkk, dvv = (t.transpose(1, 2) for t in g_ref)  # [B*C, N or L+N, H, Dh]
        diffs = {"out": max_rel_diff(out, ref), "dq": max_rel_diff(g[0], dqq)}
        for name, ours_own, ours_pre, copy in (("k", g[1], g[3], dkk), ("v", g[2], g[4], dvv)):
            diffs[f"d{name}"] = max_rel_diff(ours_own, copy[:, length:])
            prefix = copy[:, :length].reshape(n_req, n_c, length, h, d).sum(1).reshape(-1, h, d)
            diffs[f"dprefix_{name}"] = max_rel_diff(ours_pre, prefix)
        return diffs

    fwd = 4 * n_req * h * d * n_c * (n_tok * length + n_tok * (n_tok + 1) / 2)
    return {"shape": {"B": n_req, "L": length, "C": n_c, "N": n_tok}, "leaves": (q, k, v, pk, pv),
            "sdpa_leaves": (qq, kk, vv), "ours": ours, "sdpa": sdpa, "compare": compare, "fwd_flops": fwd}


def grads(fn, leaves, grad_out: torch.Tensor | None = None):
    out = fn()
    g = torch.ones_like(out) if grad_out is None else grad_out
    return out, torch.autograd.grad(out, leaves, g)


def timed(fn, leaves, mode: str, device: str) -> tuple[float, float]:
    """(first call seconds, median ms) of the forward (no grad) or forward + backward."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn()
    else:
        g = None

        def call():
            nonlocal g
            out = fn()
            g = torch.ones_like(out) if g is None else g
            return torch.autograd.grad(out, leaves, g)
    t0 = time.perf_counter()
    call()
    _sync(device)
    first = time.perf_counter() - t0
    return first, device_median_ms(call, device, repeats=3)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def agreement(case: dict, ours) -> dict:
    """Output and gradient differences of our provider vs SDPA on the same inputs (relative to max |SDPA|),
    for one upstream gradient of ones."""
    out, g = grads(ours, case["leaves"])
    ref, g_ref = grads(case["sdpa"], case["sdpa_leaves"])
    return {k: float(f"{v:.3g}") for k, v in case["compare"](out, g, ref, g_ref).items()}


def best_configs(op: str) -> dict:
    """The autotuner's last choice per Triton kernel of the op (empty before any Triton call)."""
    mod = sys.modules.get("kernels.triton_jagged_causal_attention" if op == "jagged"
                          else "kernels.triton_candidate_prefix_attention")
    if mod is None:
        return {}
    return {name: str(getattr(obj, "best_config", None)) for name, obj in vars(mod).items()
            if name.endswith("_tuned") and getattr(obj, "best_config", None) is not None}


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def run_op(op: str, length: int, args, device: str, dtype, ours_name: str, emit) -> None:
    case = (jagged_case if op == "jagged" else candidates_case)(length, args, device, dtype)
    providers = {ours_name: case["ours"](ours_name), "sdpa_flash": case["sdpa"]}
    for provider, fn in providers.items():
        leaves = case["sdpa_leaves"] if provider == "sdpa_flash" else case["leaves"]
        for mode in ("fwd", "fwd_bwd"):
            flops = case["fwd_flops"] * (3.5 if mode == "fwd_bwd" else 1.0)
            row = {"op": op, **case["shape"], "provider": provider, "mode": mode, "gflop": float(f"{flops / 1e9:.4g}")}
            try:
                first, ms = timed(fn, leaves, mode, device)
                row.update(ms=float(f"{ms:.4g}"), tflops=float(f"{flops / (ms * 1e-3) / 1e12:.4g}"),
                           first_call_s=round(first, 2))
                if provider == ours_name and ours_name == "triton":
                    row["autotuned"] = best_configs(op)
            except Exception as e:  # one failing provider must not hide the others
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            emit(row)
    try:
        emit({"op": op, **case["shape"], "agreement_vs_sdpa": agreement(case, providers[ours_name])})
    except Exception as e:
        emit({"op": op, **case["shape"], "agreement_vs_sdpa": {"error": f"{type(e).__name__}: {e}"[:500]}})
    del case, providers
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON path (rewritten after every row)")
    ap.add_argument("--lengths", default="1024,4096,8192")
    ap.add_argument("--ops", default="jagged,candidates")
    ap.add_argument("--tokens", type=int, default=16384, help="B * L (sequences or requests), constant over L")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dh", type=int, default=64)
    ap.add_argument("--candidates", type=int, default=64, help="C per request (candidates op)")
    ap.add_argument("--ns-tokens", type=int, default=8, help="N tokens per candidate (candidates op)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--ceiling-sizes", default="", help="matmul n values (default: 4096,8192 CUDA / 256,512 CPU)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    sizes = [int(n) for n in (args.ceiling_sizes or ("4096,8192" if device == "cuda" else "256,512")).split(",")]
    result = {
        "when": datetime.now().isoformat(timespec="seconds"), "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg_before": os.getloadavg(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "triton_configs_env": os.environ.get("RECSYS_TRITON_CONFIGS", ""),
        "flop_formula": FLOP_FORMULA, "timing": "median ms: triton.testing.do_bench on CUDA, host timer on CPU",
        "ceiling_tflops": {}, "rows": [],
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        result["ceiling_tflops"][f"{name}_matmul"] = float(f"{matmul_gflops(dt, device, sizes=sizes, reps=5) / 1e3:.4g}")
    print(f"device={result['device_name']} ceiling={result['ceiling_tflops']} TFLOP/s", flush=True)
    save()

    def emit(row: dict) -> None:
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()

    ours_name = "triton" if device == "cuda" else "torch"
    for op in args.ops.split(","):
        for length in (int(x) for x in args.lengths.split(",")):
            run_op(op, length, args, device, dtype, ours_name, emit)
    result["loadavg_after"] = os.getloadavg()
    save()
    print(args.out)


if __name__ == "__main__":
    main()
