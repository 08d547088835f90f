#!/usr/bin/env bash
# The main job on the embedded default data:
#   1. set up .venv (idempotent)
#   2. generate + ingest the synthetic data, train the `small` OneTrans ranker (recsys.train)
#   3. score the held-out test requests with the KV-cached scorer (recsys.score): AUC / GAUC
#   4. full-catalog ranking of the first test requests (every item scored): HR@10 / NDCG@10
#   5. print the headline figures
# Extra args are Hydra overrides of recsys.train, e.g.  bash scripts/main.sh train.epochs=1
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
PY=.venv/bin/python
RUN="runs/main/$(date +%Y%m%d-%H%M%S)"

report=$($PY -m recsys.train output_dir="$RUN/train" "$@" | tail -n 1)
scored=$($PY -m recsys.score checkpoint="$RUN/train" output_dir="$RUN/score" | tail -n 1)
# Catalog mode scores every item for each request: the first partition (256 requests) is the demo;
# the relevant items are each request's clicked candidates (target=positives).
catalog=$($PY -m recsys.score checkpoint="$RUN/train" output_dir="$RUN/score_catalog" mode=catalog \
  catalog.target=positives rows_per_partition=256 max_partitions=1 batch_size=16 | tail -n 1)
$PY -m recsys.report "$report" "$scored" "$catalog"
