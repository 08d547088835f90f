"""How hard the retriever's negatives are, and how well a ranker tells the listed item from them.

    .venv/bin/python bench/hard_negative_diagnostics.py --ranker <ranker run> --retriever <two-tower run>/retriever \
        --dataset <prepared dataset dir> [--batches 4] [--retrieve-k 100] [--num 4]

Per split (train / valid / test, the first ``--batches`` batches of 256 rows in file order):

* ``later_share``: the share of the retriever's top ``retrieve_k`` that the same user takes at or after the
  request in the train split (what ``train.hard_negatives.exclude_user_positives`` keeps out of the draw);
* ``p_listed_above_negative``: for ``num`` negatives drawn as training draws them (epoch 5, so not the
  batches the ranker was trained on in this order), the fraction of (listed item, negative) pairs the
  ranker scores the listed item higher (``ranker``) and the retriever does (``retriever``, its ``u . v``).
  A residual ranker's scores include its prior.

Prints one JSON object (with the load average and the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import machine  # noqa: E402

from recsys.data.config import LoaderConfig  # noqa: E402
from recsys.data.loader import RequestLoader  # noqa: E402
from recsys.data.schema import DataSchema  # noqa: E402
from recsys.data.user_items import UserPositives  # noqa: E402
from recsys.serving.load import load_ranker, resolve_checkpoint  # noqa: E402
from recsys.train.config import HardNegativesConfig  # noqa: E402
from recsys.train.hard_negatives import HardNegatives  # noqa: E402


def split_stats(args: argparse.Namespace, split: str, schema: DataSchema, ranker: torch.nn.Module,
                hard: HardNegatives, later: UserPositives) -> dict[str, float]:
    files = sorted((args.dataset / split).glob("*.parquet"))
    loader = RequestLoader(files, schema, LoaderConfig(batch_size=256, max_len=256, shuffle=False))
    taken, seen, wins_r, wins_t = 0, 0, [], []
    for i, batch in enumerate(loader):
        if i >= args.batches:
            break
        ids, _ = hard.retriever.retrieve(batch, args.retrieve_k)
        for b in range(batch.num_requests):
            taken += int(later.taken_later(int(batch.user_id[b]), int(batch.request_ts[b]), ids[b].numpy()).sum())
            seen += int((ids[b] > 0).sum())
        out = hard.augment(batch, 5, i)
        with torch.no_grad():
            r = out.with_prior(ranker(out))[:, 0]
            t = hard.retriever.candidate_scores(out)
        off = out.cand_offsets.tolist()
        old = batch.cand_offsets.tolist()
        for b in range(out.num_requests):
            n_listed = old[b + 1] - old[b]
            lo, mid, hi = off[b], off[b] + n_listed, off[b + 1]
            if hi > mid:
                wins_r.append(float((r[lo:mid, None] > r[None, mid:hi]).float().mean()))
                wins_t.append(float((t[lo:mid, None] > t[None, mid:hi]).float().mean()))
    return {"later_share": taken / max(seen, 1), "p_listed_above_negative_ranker": float(np.mean(wins_r)),
            "p_listed_above_negative_retriever": float(np.mean(wins_t)), "requests": len(wins_r)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranker", required=True)
    ap.add_argument("--retriever", required=True)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--retrieve-k", type=int, default=100)
    ap.add_argument("--num", type=int, default=4)
    args = ap.parse_args()
    schema = DataSchema.from_json((args.dataset / "schema.json").read_text())
    train_files = sorted((args.dataset / "train").glob("*.parquet"))
    ranker, _, ckpt_cfg = load_ranker(resolve_checkpoint(args.ranker), torch.device("cpu"))
    residual = ckpt_cfg.get("score_prior") is not None  # its scores are logits + the retriever's u . v
    cfg = HardNegativesConfig(args.retriever, args.retrieve_k, args.num, "positive", prior=residual)
    hard = HardNegatives(cfg, schema, train_files, args.dataset, seed=0, rank=0)
    later = UserPositives(train_files, schema, every_listed=True)
    out = {split: split_stats(args, split, schema, ranker, hard, later) for split in ("train", "valid", "test")}
    print(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "splits": out,
                      "loadavg": os.getloadavg(), **machine()}, indent=2))


if __name__ == "__main__":
    main()
