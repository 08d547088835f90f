"""``python -m recsys.data``: prepare the configured dataset and stream its train split once.

    python -m recsys.data                                  # embedded synthetic default
    python -m recsys.data data=tiny                        # seconds; what the tests use
    python -m recsys.data data=ml100k data.loader.num_workers=2
    python -m recsys.data data=eventlog data.eventlog.events=events.csv   # your own log (configs/data/eventlog.yaml)

Prints the dataset summary (requests, candidates, history lengths, oracle AUC for
synthetic data) and the loader's throughput over one pass of the train split.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from recsys.data.config import DataConfig, DataSource
from recsys.reliability.entry import exit_on_input_error

if TYPE_CHECKING:
    from recsys.data.prepare import PreparedDataset


@dataclass
class PrepareConfig:
    """Top-level config of the data preparation command (configs/prepare.yaml)."""

    data: DataConfig = field(default_factory=DataConfig)
    """The dataset (config group ``data``)."""
    progress: bool = True
    """Show progress bars."""
    loader_pass: bool = True
    """After preparing, stream the train split (test: a log encoded with stored id maps) once through
    RequestLoader and time it."""


ConfigStore.instance().store(name="prepare_schema", node=PrepareConfig)
COUNTERS = ("duplicate_events_dropped", "user_ids_normalized", "item_ids_normalized", "timestamp_unit", "new_users",
            "unknown_items", "unknown_item_rows", "unknown_actions", "unknown_action_rows")
"""Counters of the ingest policies printed in the summary (``IngestResult.counters``)."""


def _print_summary(prepared: PreparedDataset) -> None:
    s = prepared.summary
    print(f"dataset  {prepared.path}  ({'reused from cache' if prepared.cached else 'built'})")
    print(f"requests {s.get('requests')}  candidates {s.get('candidates')}  users {s.get('users')}  "
          f"items (table) {prepared.schema.num_items}")
    for name, split in s.get("splits", {}).items():
        line = f"  {name:<5} requests {split['requests']:>8}  candidates {split['candidates']:>9}  " \
               f"positive rate {split['positive_rate']}"
        if "oracle_auc" in split:
            line += f"  oracle AUC {split['oracle_auc']}"
        print(line)
    counted = {k: s[k] for k in COUNTERS if k in s}
    if counted:  # what the input policies did (ingested logs only)
        print(f"  input policies {json.dumps(counted)}")
    for kind, st in s.get("history_length", {}).items():
        print(f"  history {kind:<9} {json.dumps(st)}")
    if "timings" in s:
        print(f"  prepare timings (s) {json.dumps(s['timings'])}")


def run(cfg: PrepareConfig) -> dict:
    """Prepares the dataset, optionally times one loader pass; returns the numbers printed."""
    from recsys.data.prepare import prepare_dataset  # heavy imports (torch, polars) after config validation

    t0 = time.perf_counter()
    # a log encoded with stored id maps holds test rows only (rows for a trained model to score)
    split = "test" if cfg.data.source == DataSource.eventlog and cfg.data.eventlog.id_maps_from else "train"
    prepared = prepare_dataset(cfg.data, progress=cfg.progress, need=(split,))
    prepare_s = time.perf_counter() - t0
    _print_summary(prepared)
    out = {"prepare_s": round(prepare_s, 3), "path": str(prepared.path)}
    if cfg.loader_pass:
        from tqdm import tqdm

        from recsys.data.loader import RequestLoader  # torchrec: only for the loader pass

        loader = RequestLoader(prepared.splits[split], prepared.schema, cfg.data.loader)
        n_req = n_cand = 0
        t1 = time.perf_counter()
        for batch in tqdm(loader, total=len(loader), desc=f"{split} pass", unit="batch", disable=not cfg.progress):
            n_req += batch.num_requests
            n_cand += batch.num_candidates
        dt = time.perf_counter() - t1
        out.update(loader_requests=n_req, loader_s=round(dt, 3), loader_requests_per_s=round(n_req / dt),
                   loader_candidates_per_s=round(n_cand / dt))
        print(f"loader   {n_req} requests, {n_cand} candidates in {dt:.2f} s: {n_req / dt:,.0f} requests/s, "
              f"{n_cand / dt:,.0f} candidates/s (num_workers={cfg.data.loader.num_workers}, "
              f"batch_size={cfg.data.loader.batch_size}, max_len={cfg.data.loader.max_len})")
    return out


@hydra.main(version_base="1.3", config_path="../configs", config_name="prepare")
@exit_on_input_error
def main(cfg: DictConfig) -> None:
    run(OmegaConf.to_object(cfg))  # a PrepareConfig (prepare_schema): runs every __post_init__ validation


if __name__ == "__main__":
    main()
