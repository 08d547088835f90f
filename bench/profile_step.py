"""Where the time of a training step (and of cached scoring) goes, by op group, with torch.profiler.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python bench/profile_step.py \
        [--shape default|long] [--threads 1] [--steps 3] [--preset small] [--scorer] [--override k=v ...]

Workload: ``bench/train_workload.py`` (real synthetic batches, the ``recsys.train`` step). The model's
pieces are wrapped in ``record_function`` labels (the bench only; the product code is untouched):
tokenizer, embedding lookups inside it, per block ``S qkv`` (norm + Q/K/V projections), ``S out+ffn``,
``NS qkv`` (per-position norm + projections), ``NS out+ffn``, rotary, the two attention ops, heads, loss,
``loss.item`` (the host sync), optimizer (non-finite check, clipping, steps). Every profiled op's *self*
time goes to its innermost label; backward ops go to the label of the forward op that created them
(autograd sequence numbers), shown as ``bwd <label>``. ``--scorer``: ``CachedScorer.score_batch`` over
test batches with a fresh cache (misses, then appends of users seen earlier), labels for the cache
bookkeeping, stage 1 and stage 2.

Writes ``bench/results/profile_step-<shape>[-scorer].json`` and ``.md`` (the table); prints the table.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, matmul_gflops, write_json  # noqa: E402
from train_workload import TrainStep, load_batches, model_config  # noqa: E402

import recsys.model.block as block_mod  # noqa: E402
import recsys.model.ranker as ranker_mod  # noqa: E402

PREFIX = "grp:"
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_mkldnn_matmul"}
FLASH_OPS = {"aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


def labelled(fn, name: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(PREFIX + name):
            return fn(*args, **kwargs)
    return wrapper


def label_model(model) -> None:
    """Wrap the ranker's pieces in profiler labels (instance and module attributes of this process only)."""
    for cls_name, method, name in (("s_project", "s_project", "S qkv"), ("s_finish", "s_finish", "S out+ffn"),
                                   ("ns_project", "ns_project", "NS qkv"), ("ns_finish", "ns_finish", "NS out+ffn")):
        setattr(block_mod.OneTransBlock, method, labelled(getattr(block_mod.OneTransBlock, cls_name), name))
    block_mod.rotary = labelled(block_mod.rotary, "rotary")
    ranker_mod.jagged_causal_attention = labelled(ranker_mod.jagged_causal_attention, "attn S (jagged causal)")
    ranker_mod.candidate_prefix_attention = labelled(ranker_mod.candidate_prefix_attention, "attn NS (cand-prefix)")
    tok = model.tokenizer
    tok.forward = labelled(tok.forward, "tokenizer (other)")
    for method in ("sequence", "pooled"):  # FeatureEmbeddings: the torchrec table lookups
        setattr(tok.embeddings, method, labelled(getattr(tok.embeddings, method), "embedding lookups"))
    model.heads.forward = labelled(model.heads.forward, "heads")
    model.rank = labelled(model.rank, "ranker glue")


def label_step(step: TrainStep) -> None:
    import train_workload

    train_workload.multitask_bce = labelled(train_workload.multitask_bce, "loss")
    train_workload.grads_finite = labelled(train_workload.grads_finite, "optimizer (+clip, finite check)")
    torch.nn.utils.clip_grad_norm_ = labelled(torch.nn.utils.clip_grad_norm_, "optimizer (+clip, finite check)")
    for opt in (step.opt_sparse, step.opt_dense):
        opt.step = labelled(opt.step, "optimizer (+clip, finite check)")
        opt.zero_grad = labelled(opt.zero_grad, "optimizer (+clip, finite check)")


def _label_of(ev, cache: dict) -> str:
    """Innermost ``grp:`` label above ``ev`` (or ``ev`` itself); ``-`` when none."""
    key = id(ev)
    if key not in cache:
        if ev.name.startswith(PREFIX):
            cache[key] = ev.name[len(PREFIX):]
        elif ev.cpu_parent is None:
            cache[key] = "-"
        else:
            cache[key] = _label_of(ev.cpu_parent, cache)
    return cache[key]


def _backward_root(ev):
    while ev is not None and not ev.name.startswith("autograd::engine::evaluate_function"):
        ev = ev.cpu_parent
    return ev


def attribute(events) -> dict[str, dict[str, float]]:
    """Self time (us) per group and its matmul / flash-attention shares, backward by sequence number."""
    cache: dict = {}
    fwd_group: dict[int, str] = {}
    for ev in events:
        if ev.sequence_nr >= 0 and _backward_root(ev) is None:
            fwd_group.setdefault(ev.sequence_nr, _label_of(ev, cache))
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    op_time: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for ev in events:
        if ev.name.startswith(PREFIX):
            group = _label_of(ev, cache)
        else:
            root = _backward_root(ev)
            group = _label_of(ev, cache) if root is None else "bwd " + fwd_group.get(root.sequence_nr, "autograd other")
        t = ev.self_cpu_time_total
        out[group]["us"] += t
        op_time[group][ev.name] += t
        if ev.name in MATMUL_OPS:
            out[group]["matmul_us"] += t
        if ev.name in FLASH_OPS:
            out[group]["flash_us"] += t
        if ev.name in ("aten::item", "aten::_local_scalar_dense"):
            out[group]["item_calls"] += 1
    for group, ops in op_time.items():
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:3]
        out[group]["top"] = [(name, t) for name, t in top]  # type: ignore[assignment]
    return out


def table(groups: dict, steps: int, wall_ms: float) -> str:
    total = sum(g["us"] for g in groups.values())
    lines = ["| group | ms / step | % | matmul ms | flash-attn ms | top self ops (ms / step) |",
             "|---|---:|---:|---:|---:|---|"]
    for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["us"]):
        if g["us"] / total < 0.002:
            continue
        top = ", ".join(f"{op.replace('aten::', '')} {t / steps / 1e3:.0f}" for op, t in g["top"])
        lines.append(f"| {name} | {g['us'] / steps / 1e3:.1f} | {100 * g['us'] / total:.1f} | "
                     f"{g.get('matmul_us', 0) / steps / 1e3:.1f} | {g.get('flash_us', 0) / steps / 1e3:.1f} | {top} |")
    lines.append(f"| **profiled total** | {total / steps / 1e3:.1f} | 100 | | | wall {wall_ms:.0f} ms / step "
                 f"(unprofiled median) |")
    return "\n".join(lines)


def scorer_run(schema, cfg, batches):
    import recsys.serving.scorer as scorer_mod
    import recsys.serving.state as state_mod
    from recsys.serving.cache import UserKVCache
    from recsys.serving.scorer import CachedScorer

    step = TrainStep(schema, cfg)
    model = step.model.eval()
    label_model(model)
    state_mod.jagged_causal_attention = labelled(state_mod.jagged_causal_attention, "attn S (jagged causal)")
    scorer_mod.extend_states = labelled(scorer_mod.extend_states, "stage 1 (extend states)")
    scorer_mod.states_to_prefix = labelled(scorer_mod.states_to_prefix, "prefix concat")
    scorer_mod.score_in_chunks = labelled(scorer_mod.score_in_chunks, "stage 2 (ranker glue)")
    scorer_mod.merged_events = labelled(scorer_mod.merged_events, "cache: event identities")
    CachedScorer.user_states = labelled(CachedScorer.user_states, "cache bookkeeping")

    def run() -> None:
        scorer = CachedScorer(model, UserKVCache(512 << 20), candidate_chunk=512)
        for b in batches:
            scorer.score_batch(b)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="default", choices=("default", "long"))
    ap.add_argument("--preset", default="small")
    ap.add_argument("--override", nargs="*", default=[], help="model key=value overrides")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (one batch each)")
    ap.add_argument("--bf16", action="store_true", help="the training loop's bf16 autocast")
    ap.add_argument("--scorer", action="store_true", help="profile CachedScorer.score_batch instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = model_config(args.preset, args.override)
    schema, batches = load_batches(args.shape, args.steps, split="test" if args.scorer else "train")
    if args.scorer:
        run = scorer_run(schema, cfg, batches)
        n_cand = sum(b.num_candidates for b in batches)
    else:
        step = TrainStep(schema, cfg, bf16=args.bf16)
        label_model(step.model)
        label_step(step)

        def run() -> None:
            for b in batches:
                step(b)
        n_cand = sum(b.num_candidates for b in batches)
    load_before = os.getloadavg()
    run()  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3 / args.steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    groups = attribute(prof.events())
    wall = statistics.median(times)
    md = table(groups, args.steps, wall)
    load = [load_before, os.getloadavg()]
    name = f"profile_step-{args.shape}" + ("-scorer" if args.scorer else "")
    header = (f"`{' '.join(['bench/profile_step.py', *sys.argv[1:]])}`: {args.steps} batches, "
              f"{n_cand / args.steps:.0f} candidates per batch, threads={args.threads}, "
              f"{n_cand / args.steps / (wall / 1e3):.0f} candidates/s; loadavg before {load_before[0]:.2f}, "
              f"after {load[1][0]:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(header + "\n\n" + md + "\n")
    print(header)
    print(md)
    print(write_json(name, {"args": vars(args), "machine": machine(), "loadavg": load,
                            "matmul_fp32_gflops": matmul_gflops(), "wall_ms_per_batch_median": wall,
                            "wall_ms_per_batch": times, "candidates_per_batch": n_cand / args.steps,
                            "groups_us_total": {k: dict(v) for k, v in groups.items()}}))


if __name__ == "__main__":
    main()
