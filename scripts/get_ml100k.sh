#!/usr/bin/env bash
# Downloads MovieLens-100k into data/raw/ml-100k/ (ml-100k.inter/.user/.item).
#
#   bash scripts/get_ml100k.sh            # idempotent; ~2 MB from PyPI, once
#
# The data ships inside the recbole==1.2.1 wheel (recbole/dataset_example/ml-100k/);
# the wheel is fetched with `pip download --no-deps --only-binary=:all:` into data/raw/
# and only those three files are extracted. data/ is git-ignored: never commit them.
# `python -m recsys.data data=ml100k` does the same on first use.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
cd "$ROOT"
"$PY" -c "from recsys.data.ml100k import ensure_ml100k; print(ensure_ml100k('data/raw'))"
