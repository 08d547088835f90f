#!/usr/bin/env bash
# The main job on the embedded default data, retrieve -> rank:
#   1. set up .venv (idempotent)
#   2. generate + ingest the synthetic data; train the two-tower retriever (recsys.train model=two_tower,
#      early stopping on validation recall@10, best weights kept) -> <run>/retriever/retriever
#   3. train the `small` OneTrans ranker (recsys.train)
#   4. score the held-out test requests with the KV-cached scorer (recsys.score): AUC / GAUC
#   5. the cascade on the same requests (recsys.score mode=cascade): the retriever's top 100 of the
#      5,000 items re-ranked by the ranker, top 10 written: recall@100, HR@10 / NDCG@10 (targets = the
#      request's clicked candidates, seen items allowed), and the retriever alone
#   6. print the headline figures
# Extra args are Hydra overrides of the ranker's recsys.train (data.* / data=... go to the retriever too),
# e.g.  bash scripts/main.sh train.epochs=1
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
PY=.venv/bin/python
RUN="runs/main/$(date +%Y%m%d-%H%M%S)"
DATA_ARGS=()
for a in "$@"; do
  case "$a" in data=*|data.*) DATA_ARGS+=("$a") ;; esac
done

retriever=$($PY -m recsys.train model=two_tower output_dir="$RUN/retriever" train.epochs=1 train.eval_every=20 \
  train.early_stopping.metric=valid_recall@10 train.early_stopping.patience=4 ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} | tail -n 1)
report=$($PY -m recsys.train output_dir="$RUN/train" "$@" | tail -n 1)
scored=$($PY -m recsys.score checkpoint="$RUN/train" output_dir="$RUN/score" | tail -n 1)
cascade=$($PY -m recsys.score checkpoint="$RUN/train" output_dir="$RUN/cascade" mode=cascade \
  "cascade.retrievers=['$RUN/retriever/retriever']" cascade.retrieve_k=100 cascade.top_n=10 | tail -n 1)
$PY -m recsys.report "$retriever" "$report" "$scored" "$cascade"
