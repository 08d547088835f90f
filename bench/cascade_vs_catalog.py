"""Full-catalog ranking vs retrieve -> rank, on the same requests and checkpoint, in one process.

    .venv/bin/python bench/cascade_vs_catalog.py --checkpoint <ranker run> --retrievers <dir> [<dir>] \
        [--retrieve-k 100] [--top-n 10] [--repeats 3] [--inputs <files>] [--batch-size 16]
    .venv/bin/python bench/cascade_vs_catalog.py --demo       # tiny data, random ranker and retrievers

Both modes run through the real scoring job (``recsys.serving.job.run_scoring``, in-process, a fresh
output directory per run), interleaved ``catalog, cascade, catalog, cascade, ...`` ``--repeats`` times
(medians reported; other jobs share the machine, so the load average is recorded). Per mode:
``per_request_ms`` = the job's loop time (read + score + write) / requests, ``model_per_request_ms`` =
its model time / requests, and the metrics over its output: NDCG@10 / HR@10 of both with the same
relevant items (``--target``: ``positives``, the request's candidates labelled 1 on the ranked task, or
``candidates``, every listed one, for leave-one-out data such as ml-100k; ``--exclude-seen`` drops history
items from both rankings), the cascade's recall@K per retriever and of the union, and its per-stage
seconds. ``time_ratio`` = cascade / catalog per-request time (< 1: the cascade is faster).

``--demo`` only checks that the bench runs: a random ranker and untrained retrievers, whose recall and
NDCG mean nothing. The real figures need trained retrievers (the trainer writes the artifacts).
Last printed line: the JSON path (``bench/results/cascade_vs_catalog.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import machine, write_json  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from recsys.serving.config import register_configs  # noqa: E402
from recsys.serving.job import run_scoring  # noqa: E402

CONFIGS = ROOT / "recsys" / "configs"


def demo_inputs(tmp: Path) -> tuple[Path, list[Path]]:
    """A tiny dataset, a random debug ranker and random two-tower + SID retrievers (tests' fixtures)."""
    sys.path.insert(0, str(ROOT / "tests" / "serving"))
    from job_fixtures import make_checkpoint, make_retrievers, tiny_data_config

    ckpt = make_checkpoint(tmp / "run", tiny_data_config(tmp / "data"))
    return ckpt, list(make_retrievers(tmp / "retrievers", ckpt).values())


def run_mode(args: argparse.Namespace, ckpt: Path, retrievers: list[Path], mode: str, out: Path) -> dict[str, Any]:
    overrides = [f"checkpoint={ckpt}", f"output_dir={out}", f"mode={mode}", "progress=false",
                 f"num_threads={args.threads}", f"batch_size={args.batch_size}", f"catalog.target={args.target}",
                 f"catalog.k={args.k}", f"catalog.top_k={args.top_n}",
                 f"catalog.exclude_history={str(args.exclude_seen).lower()}"]
    if args.inputs:
        overrides.append("inputs=[" + ",".join(f"'{p}'" for p in args.inputs) + "]")
    if mode == "cascade":
        overrides += ["cascade.retrievers=[" + ",".join(f"'{p}'" for p in retrievers) + "]",
                      f"cascade.retrieve_k={args.retrieve_k}", f"cascade.top_n={args.top_n}",
                      f"cascade.target={args.target}", f"cascade.exclude_seen={str(args.exclude_seen).lower()}"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("score", overrides=overrides))
    s = json.loads(run_scoring(cfg).read_text())
    return {"per_request_ms": 1e3 * s["loop_time_s"] / s["requests"],
            "model_per_request_ms": 1e3 * s["score_time_s"] / s["requests"], "requests": s["requests"],
            "candidates_per_request": s["candidates"] / s["requests"], "metrics": s["metrics"],
            "stage_time_s": s["stage_time_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--retrievers", nargs="*", default=[])
    p.add_argument("--inputs", nargs="*", default=[])
    p.add_argument("--retrieve-k", type=int, default=100)
    p.add_argument("--top-n", type=int, default=10)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--target", choices=["positives", "candidates"], default="positives",
                   help="relevant items: clicked candidates (default) or every listed one (leave-one-out, ml-100k)")
    p.add_argument("--exclude-seen", action="store_true",
                   help="history items out of both rankings (catalog.exclude_history / cascade.exclude_seen)")
    p.add_argument("--demo", action="store_true")
    args = p.parse_args()
    register_configs()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if args.demo:
            ckpt, retrievers = demo_inputs(tmp)
            args.retrieve_k, args.top_n = min(args.retrieve_k, 20), min(args.top_n, 10)
        else:
            if not args.checkpoint or not args.retrievers:
                p.error("--checkpoint and --retrievers are required (or --demo)")
            ckpt, retrievers = Path(args.checkpoint), [Path(r) for r in args.retrievers]
        runs: dict[str, list[dict[str, Any]]] = {"catalog": [], "cascade": []}
        load = [os.getloadavg()]
        for i in range(args.repeats):
            for mode in runs:  # interleaved: both modes see the same machine load
                runs[mode].append(run_mode(args, ckpt, retrievers, mode, tmp / f"{mode}-{i}"))
            load.append(os.getloadavg())
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("per_request_ms", "model_per_request_ms")}
           for m, rs in runs.items()}
    k = args.k
    result = {
        "demo_untrained": args.demo, "checkpoint": str(ckpt), "retrievers": [str(r) for r in retrievers],
        "retrieve_k": args.retrieve_k, "top_n": args.top_n, "batch_size": args.batch_size, "repeats": args.repeats,
        "target": args.target, "exclude_seen": args.exclude_seen,
        "machine": machine(), "loadavg": load,
        "median": med, "time_ratio": med["cascade"]["per_request_ms"] / med["catalog"]["per_request_ms"],
        "model_time_ratio": med["cascade"]["model_per_request_ms"] / med["catalog"]["model_per_request_ms"],
        f"ndcg@{k}": {m: rs[0]["metrics"].get(f"ndcg@{k}") for m, rs in runs.items()},
        f"hr@{k}": {m: rs[0]["metrics"].get(f"hr@{k}") for m, rs in runs.items()},
        "cascade_metrics": runs["cascade"][0]["metrics"], "cascade_stage_time_s": runs["cascade"][0]["stage_time_s"],
        "runs": runs,
    }
    print(json.dumps({k2: result[k2] for k2 in ("median", "time_ratio", f"ndcg@{k}", "loadavg")}, indent=1))
    print(write_json("cascade_vs_catalog", result))


if __name__ == "__main__":
    main()
