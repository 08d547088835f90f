"""Peak memory of scoring one request against C candidates, with and without candidate-sliced tokenization.

    .venv/bin/python bench/scoring_memory.py                  # C in 2k, 16k, 64k
    .venv/bin/python bench/scoring_memory.py --cands 2000 8000

Each (C, mode) runs in a fresh subprocess; the figure is the growth of the process's peak RSS
(``ru_maxrss``) across ``CachedScorer.score_batch`` (model, batch and imports already resident, so
it is the transient memory of scoring). Modes: ``sliced`` = the default ``tokenize_chunk=4096`` (NS
tokens built 4096 candidate rows at a time); ``chunk_2048`` / ``chunk_16384`` = that ``tokenize_chunk``;
``unsliced`` = ``tokenize_chunk`` larger than C (the whole ``[C, N, D]`` NS tensor at once, the behaviour before).
``candidate_chunk=512`` (stage 2) in all.
Model: d_model 128, 4 NS tokens, 2 layers; history 1000 events per kind, cut to max_len 64.
Writes bench/results/scoring_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "scoring_memory.json"


def one(cands: int, mode: str) -> dict:
    import numpy as np
    import pyarrow as pa
    import torch

    from recsys.data.collate import collate
    from recsys.model.config import ModelConfig, PyramidConfig
    from recsys.model.ranker import OneTransRanker
    from recsys.serving.scorer import CachedScorer
    from recsys.testing import tiny_schema

    torch.set_num_threads(1)
    schema, max_len, hist = tiny_schema(), 64, 1000
    rng = np.random.default_rng(0)
    data = {"request_id": [0], "user_id": [1], "request_ts": [10**9], "u_feat0": [1], "u_feat1": [1],
            "dense0": [0.1], "dense1": [0.2]}
    for k in schema.sequences:
        data[schema.seq_col(k, "ts")] = [sorted(rng.integers(0, 10**8, hist).tolist())]
        for fld in ("item_id", "category", "action"):
            data[schema.seq_col(k, fld)] = [rng.integers(1, schema.table_size(fld), hist).tolist()]
    data["cand_item_id"] = [rng.integers(1, schema.num_items, cands).tolist()]
    data["cand_category"] = [rng.integers(1, schema.num_categories, cands).tolist()]
    for t in schema.tasks:
        data[f"cand_label_{t}"] = [np.zeros(cands).tolist()]
    batch = collate(pa.Table.from_pydict(data, schema=schema.arrow_schema()), schema, max_len)
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=128, n_heads=4, n_layers=2, ffn_mult=2, n_ns_tokens=4, emb_dim=16, head_hidden=32,
                      pyramid=PyramidConfig(mode="none"), attention_backend="torch")
    model = OneTransRanker(schema, cfg, max_s_tokens=len(schema.sequences) * max_len).eval()
    chunk = {"sliced": 4096, "chunk_2048": 2048, "chunk_16384": 16384, "unsliced": cands + 1}[mode]
    scorer = CachedScorer(model, None, candidate_chunk=512, tokenize_chunk=chunk)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    logits = scorer.score_batch(batch)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ns_bytes = cands * cfg.n_ns_tokens * cfg.d_model * 4
    return {"candidates": cands, "mode": mode, "peak_rss_growth_mib": (after - before) / 1024,
            "ns_tokens_all_at_once_mib": ns_bytes / 2**20, "score_s": wall, "finite": bool(torch.isfinite(logits).all())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cands", type=int, nargs="+", default=[2000, 16000, 64000])
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1])))
        return
    rows = []
    for c in args.cands:
        for mode in ("sliced", "chunk_2048", "chunk_16384", "unsliced"):
            out = subprocess.run([sys.executable, __file__, "--one", str(c), mode], capture_output=True, text=True,
                                 check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"rows": rows, "note": __doc__.split("\n\n")[2]}, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
