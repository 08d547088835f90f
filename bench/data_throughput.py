"""Data-stage throughput: synthetic generation + Parquet writing, and RequestLoader reading.

    .venv/bin/python bench/data_throughput.py [--candidates 1000000] [--workers 0 2]

Generator: a synthetic config (the embedded default's shape) scaled to ``--candidates``
candidate rows (num_users = candidates / (requests_per_user x candidates_per_request));
times ``generate`` (rows in memory, including the history ingest) and the Parquet
write separately; rows/s = candidate rows / seconds.

Loader: ``--passes`` full passes over the generated train split per ``num_workers``
value (after one warm-up pass; the median pass is reported), batch 256 requests,
max_len 256; worker start-up is inside each pass, as in training. Reports requests/s,
candidates/s, history events/s (after truncation) and Parquet MB/s (compressed
bytes on disk / s; the byte count the reader actually pulls).
Last printed line: the JSON path.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

from recsys.data.config import LoaderConfig, SyntheticConfig  # noqa: E402
from recsys.data.loader import RequestLoader  # noqa: E402
from recsys.data.prepare import write_dataset  # noqa: E402
from recsys.data.synthetic import generate  # noqa: E402


def loader_pass(files: list[Path], schema, cfg: LoaderConfig) -> dict:
    n_req = n_cand = n_events = 0
    t0 = time.perf_counter()
    for batch in RequestLoader(files, schema, cfg):
        n_req += batch.num_requests
        n_cand += batch.num_candidates
        n_events += int(batch.seq_ts.values().numel())
    dt = time.perf_counter() - t0
    mb = sum(f.stat().st_size for f in files) / 1e6
    return {"num_workers": cfg.num_workers, "seconds": round(dt, 3), "requests": n_req,
            "requests_per_s": round(n_req / dt), "candidates_per_s": round(n_cand / dt),
            "history_events_per_s": round(n_events / dt), "parquet_mb_per_s": round(mb / dt, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=1_000_000, help="candidate rows to generate")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader num_workers values")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--passes", type=int, default=3, help="timed loader passes (the median is reported)")
    args = ap.parse_args()

    base = SyntheticConfig()
    num_users = max(1, round(args.candidates / (base.requests_per_user * base.candidates_per_request)))
    syn = dataclasses.replace(base, num_users=num_users)
    t0 = time.perf_counter()
    data = generate(syn)
    gen_s = time.perf_counter() - t0
    n_cand = len(data.columns["cand_item_id"].values)
    n_req = data.columns["cand_item_id"].num_rows
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        write_dataset(Path(tmp), data.schema, data.columns, data.split, row_group_size=1024, seed=0)
        write_s = time.perf_counter() - t1
        files = sorted((Path(tmp) / "train").glob("*.parquet"))
        disk_mb = sum(f.stat().st_size for f in Path(tmp).rglob("*.parquet")) / 1e6
        generator = {
            "num_users": num_users, "requests": n_req, "candidate_rows": n_cand, "events": data.num_events,
            "history_events_stored": int(sum(data.columns[f"seq_{k}_ts"].values.size for k in syn.sequences)),
            "generate_s": round(gen_s, 3), "generate_rows_per_s": round(n_cand / gen_s),
            "write_parquet_s": round(write_s, 3), "parquet_mb": round(disk_mb, 1),
            "generate_plus_write_s": round(gen_s + write_s, 3),
            "generate_plus_write_rows_per_s": round(n_cand / (gen_s + write_s)),
            "stage_timings_s": {k: round(v, 3) for k, v in data.timings.items()},
        }
        print(f"generator: {n_cand:,} candidate rows ({n_req:,} requests, {data.num_events:,} events) in "
              f"{gen_s:.2f} s = {n_cand / gen_s:,.0f} rows/s; + Parquet write {write_s:.2f} s "
              f"({disk_mb:.0f} MB) = {n_cand / (gen_s + write_s):,.0f} rows/s end to end")
        loaders = []
        for nw in args.workers:
            cfg = LoaderConfig(batch_size=args.batch_size, max_len=args.max_len, num_workers=nw)
            loader_pass(files, data.schema, cfg)  # warm-up: page cache, worker start-up code paths
            passes = sorted((loader_pass(files, data.schema, cfg) for _ in range(args.passes)),
                            key=lambda r: r["seconds"])
            res = {**passes[len(passes) // 2], "pass_seconds": [p["seconds"] for p in passes]}  # the median pass
            loaders.append(res)
            print(f"loader num_workers={nw}: {res['requests_per_s']:,} requests/s, "
                  f"{res['candidates_per_s']:,} candidates/s, {res['history_events_per_s']:,} history events/s, "
                  f"{res['parquet_mb_per_s']} MB/s of Parquet ({res['requests']:,} requests in {res['seconds']} s)")
    payload = {"bench": "data_throughput", "machine": machine(), "args": vars(args), "generator": generator,
               "loader": {"batch_size": args.batch_size, "max_len": args.max_len, "runs": loaders}}
    print(write_json("data_throughput", payload))


if __name__ == "__main__":
    main()
