#!/usr/bin/env bash
# The main job on the embedded default: set up, generate + ingest the synthetic data,
# train the `small` OneTrans ranker, evaluate on the held-out test split, print the report.
#   bash scripts/main.sh                       # defaults
#   bash scripts/main.sh data=ml100k           # extra args are Hydra overrides of recsys.train
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
report=$(.venv/bin/python -m recsys.train "$@" | tail -n 1)
.venv/bin/python -m recsys.report "$report"
echo "$report"
