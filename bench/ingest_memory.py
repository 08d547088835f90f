"""Peak memory of ingesting an event log with one very heavy user.

    .venv/bin/python bench/ingest_memory.py                          # 10^6 + 10^6 events, max_history 256
    .venv/bin/python bench/ingest_memory.py --heavy 100000 --others 100000 --max-history 64

The log: one user with ``--heavy`` events plus ``--others`` events spread over ``--users`` other users
(two kinds, 80/20; items uniform over 50,000; times in seconds over 100 days), written once as Parquet.
Every event is a request, so the heavy user alone has ``--heavy`` requests whose histories overlap.
``max_history`` (default 256 = ``loader.max_len``'s default, so nothing the ranker reads is cut) bounds
the output: at most ``requests * max_history`` (request, event) pairs per kind.

Each mode runs in a fresh subprocess; the figure is the child's peak RSS (``ru_maxrss``), reported with
the RSS after imports (torch, polars, pyarrow: the same in every mode). Modes: ``ingest`` =
``ingest_event_log`` (the rows in memory), ``ingest+write`` = that plus ``prepare.write_dataset`` (every
split to Parquet, one row group at a time, plus the summaries). ``pairs`` is the number of (request,
history event) pairs the output holds; ``eager_history_mib`` what those pairs take as four int64
columns plus the gather index, i.e. what building them all at once (the code before) needed on top.
Writes bench/results/ingest_memory.json (with ``os.getloadavg()`` before and after: a memory figure is
not disturbed by load the way a time is, but the times are reported too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "ingest_memory.json"
MODES = ("ingest", "ingest+write")


def make_log(path: Path, heavy: int, others: int, users: int, seed: int = 0) -> None:
    """The event log of the module docstring, as one Parquet file."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    n = heavy + others
    user = np.concatenate([np.zeros(heavy, np.int64), rng.integers(1, users + 1, others)])
    ts = 1_600_000_000 + rng.integers(0, 100 * 86400, n)
    pl.DataFrame({"user_id": user, "item_id": rng.integers(1, 50_001, n), "timestamp": ts,
                  "kind": np.where(rng.random(n) < 0.8, "click", "like"),
                  "action": rng.integers(1, 6, n)}).write_parquet(path)


def child(mode: str, log: str, max_history: int) -> dict:
    """One mode in this (fresh) process: peak RSS and times."""
    from recsys.data.ingest import ingest_event_log
    from recsys.data.prepare import write_dataset

    base_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    res = ingest_event_log(log, max_history=max_history)
    ingest_s = time.perf_counter() - t0
    out = {"mode": mode, "requests": int(len(res.split)), "rss_after_imports_mib": round(base_mib, 1),
           "pairs": int(sum(res.columns[res.schema.seq_col(k, "ts")].lengths.sum() for k in res.schema.sequences)),
           "ingest_s": round(ingest_s, 2)}
    if mode == "ingest+write":
        with tempfile.TemporaryDirectory(dir=Path(log).parent) as d:
            t1 = time.perf_counter()
            write_dataset(Path(d), res.schema, res.columns, res.split, row_group_size=1024, seed=0)
            out["write_s"] = round(time.perf_counter() - t1, 2)
            out["parquet_mib"] = round(sum(f.stat().st_size for f in Path(d).rglob("*.parquet")) / 2**20, 1)
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heavy", type=int, default=1_000_000, help="events of the one heavy user")
    ap.add_argument("--others", type=int, default=1_000_000, help="events of all other users together")
    ap.add_argument("--users", type=int, default=10_000, help="number of other users")
    ap.add_argument("--max-history", type=int, default=256)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]))))
        return
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "events.parquet"
        make_log(log, args.heavy, args.others, args.users)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        for mode in args.modes:
            proc = subprocess.run([sys.executable, __file__, "--child", mode, str(log), str(args.max_history)],
                                  capture_output=True, text=True, env=env, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"{mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["eager_history_mib"] = round(row["pairs"] * (4 + 1) * 8 / 2**20, 1)
            rows.append(row)
            print(json.dumps(row))
    payload = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "heavy_user_events": args.heavy,
               "other_events": args.others, "other_users": args.users, "max_history": args.max_history,
               "target_peak_rss_mib": 2048, "results": rows, "loadavg_before": load_before,
               "loadavg_after": os.getloadavg(), "cpus": os.cpu_count(), "processor": platform.machine()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(payload, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
