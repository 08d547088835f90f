"""Where the wall time of a training step goes, by model piece, without torch.profiler.

    PYTHONPATH=$PWD OMP_NUM_THREADS=2 .venv/bin/python bench/step_wall_split.py \
        [--shape default|long] [--threads 2] [--rounds 3] [--batches 2] [--preset small]

Why not the profiler: on the 2-core development machine ``bench/profile_step.py --threads 2`` gave
``aten::silu`` in the NS FFN 56 ms per step (three calls on ``[4096, 4, 256]``), while one such call
takes 1.2 ms timed with ``perf_counter`` in an unprofiled step (median of 30): memory-bound ops run
several times slower under the profiler, so its per-op split overstates them (its op counts and
shapes stay useful).

Here the forward of every piece (tokenizer, per block ``S qkv``, ``attn S``, ``S out+ffn``, ``NS qkv``,
``attn NS``, ``NS out+ffn``, heads) is timed with ``perf_counter`` (CPU ops run synchronously), and
the backward by identity autograd nodes on each piece's inputs and outputs: the engine runs a piece's
backward between the node on its outputs and the one on its inputs, so the time between consecutive
markers goes to the piece whose output marker opened it (``glue``: between a piece's inputs and the
next piece's outputs). Marker overhead is a few microseconds per piece and layer. Workload and step:
``bench/train_workload.py`` (real batches, the ``recsys.train`` step: loss, ``zero_grad``, backward,
non-finite check, clipping, both optimizers), after one warm-up pass.

Writes ``bench/results/step_wall_split-<shape>.json`` (load average before and after) and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402
from train_workload import TrainStep, load_batches, model_config  # noqa: E402

import recsys.model.block as block_mod  # noqa: E402
import recsys.model.ranker as ranker_mod  # noqa: E402
from recsys.model.heads import multitask_bce  # noqa: E402
from recsys.reliability.guards import grads_finite  # noqa: E402

EVENTS: list[tuple[float, str, str]] = []  # backward: (time, "start" | "end", piece)
FORWARD: dict[str, float] = defaultdict(float)


class _Marker(torch.autograd.Function):
    """Identity whose backward records when the gradient reaches it."""

    @staticmethod
    def forward(ctx, kind: str, name: str, *xs):  # noqa: ANN001, ANN205
        ctx.kind, ctx.name = kind, name
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):  # noqa: ANN001, ANN205
        EVENTS.append((time.perf_counter(), ctx.kind, ctx.name))
        return (None, None, *grads)


def _mark(kind: str, name: str, xs: list) -> list:
    at = [i for i, x in enumerate(xs) if isinstance(x, torch.Tensor) and x.requires_grad]
    if at:
        for i, y in zip(at, _Marker.apply(kind, name, *(xs[i] for i in at)), strict=True):
            xs[i] = y
    return xs


def _timed(fn, name: str):
    def wrapper(*args, **kwargs):
        args = _mark("end", name, list(args))
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        FORWARD[name] += time.perf_counter() - t
        if dataclasses.is_dataclass(out):  # the tokenizer's TokenizedBatch
            s, ns = _mark("start", name, [out.s_tokens, out.ns_tokens])
            return dataclasses.replace(out, s_tokens=s, ns_tokens=ns)
        if isinstance(out, torch.Tensor):
            return _mark("start", name, [out])[0]
        return tuple(_mark("start", name, list(out)))
    return wrapper


def instrument(step: TrainStep) -> None:
    """Wrap the ranker's pieces (module and instance attributes of this process only)."""
    ranker_mod.jagged_causal_attention = _timed(ranker_mod.jagged_causal_attention, "attn S")
    ranker_mod.candidate_prefix_attention = _timed(ranker_mod.candidate_prefix_attention, "attn NS")
    for method, name in (("s_project", "S qkv"), ("s_finish", "S out+ffn"), ("ns_project", "NS qkv"),
                         ("ns_finish", "NS out+ffn")):
        setattr(block_mod.OneTransBlock, method, _timed(getattr(block_mod.OneTransBlock, method), name))
    step.model.tokenizer.forward = _timed(step.model.tokenizer.forward, "tokenizer")
    step.model.heads.forward = _timed(step.model.heads.forward, "heads")


def timed_step(step: TrainStep, batch, backward: dict[str, float]) -> dict[str, float]:
    """One step of ``TrainStep``'s sequence; the backward split is added to ``backward``."""
    EVENTS.clear()
    t0 = time.perf_counter()
    logits = step.model(batch)
    loss, _ = multitask_bce(logits, batch.labels)
    loss.item()
    t1 = time.perf_counter()
    step.opt_sparse.zero_grad(set_to_none=True)
    step.opt_dense.zero_grad(set_to_none=True)
    loss.backward()
    t2 = time.perf_counter()
    if not grads_finite(step.params):
        raise FloatingPointError("non-finite gradient in the bench step")
    torch.nn.utils.clip_grad_norm_(step.dense, step.clip)
    step.opt_sparse.step()
    step.opt_dense.step()
    t3 = time.perf_counter()
    prev, piece = t1, "loss + glue"
    for t, kind, name in EVENTS:
        backward[piece] += t - prev
        prev, piece = t, (name if kind == "start" else "glue")
    backward[piece] += t2 - prev
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="default", choices=("default", "long"))
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="timed passes over the batches")
    ap.add_argument("--batches", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    schema, batches = load_batches(args.shape, args.batches)
    step = TrainStep(schema, model_config(args.preset))
    try:  # what recsys.train applies (absent in trees before it)
        from recsys.runtime.allocator import keep_freed_memory
        keep_freed_memory()
    except ImportError:
        pass
    instrument(step)
    backward: dict[str, float] = defaultdict(float)
    for b in batches:  # warm-up
        timed_step(step, b, backward)
    backward.clear()
    FORWARD.clear()
    load = [os.getloadavg()]
    phases: dict[str, float] = defaultdict(float)
    n = args.rounds * len(batches)
    for _ in range(args.rounds):
        for b in batches:
            for k, v in timed_step(step, b, backward).items():
                phases[k] += v
    load.append(os.getloadavg())
    per_step = {k: v / n * 1e3 for k, v in phases.items()}
    pieces = {name: {"forward_ms": FORWARD[name] / n * 1e3, "backward_ms": backward[name] / n * 1e3}
              for name in set(FORWARD) | set(backward)}
    total = sum(per_step.values())
    lines = [f"`bench/step_wall_split.py --shape {args.shape} --threads {args.threads} --rounds {args.rounds} "
             f"--batches {args.batches}`: {total:.0f} ms / step (forward {per_step['forward']:.0f}, backward "
             f"{per_step['backward']:.0f}, optimizer {per_step['optimizer']:.0f}); load {load[0][0]:.2f} -> {load[1][0]:.2f}",
             "| piece | forward ms | backward ms | total ms | % of step |", "|---|---:|---:|---:|---:|"]
    for name, p in sorted(pieces.items(), key=lambda kv: -(kv[1]["forward_ms"] + kv[1]["backward_ms"])):
        both = p["forward_ms"] + p["backward_ms"]
        lines.append(f"| {name} | {p['forward_ms']:.1f} | {p['backward_ms']:.1f} | {both:.1f} | {100 * both / total:.1f} |")
    print("\n".join(lines))
    print(write_json(f"step_wall_split-{args.shape}", {
        "machine": machine(), "args": vars(args), "loadavg_before_after": load, "step_ms": per_step,
        "pieces": pieces, "table": "\n".join(lines)}))


if __name__ == "__main__":
    main()
