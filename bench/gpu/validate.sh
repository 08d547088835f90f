#!/usr/bin/env bash
# GPU validation run: compiled-Triton kernel tests, attention sweep vs torch SDPA (flash), training
# and scoring throughput, all in one JSON. See bench/gpu/README.md.
#
#   bash bench/gpu/validate.sh             # on the GPU machine (device tool: carry [".whl"], timeout_s 540)
#   bash bench/gpu/validate.sh --dry-run   # on a CPU machine: every step that needs no CUDA, tiny shapes
#
# Writes $OUT/gpu_validate.json (+ gpu_validate_logs.tar.gz, the steps' logs) when $OUT is set, else
# bench/results/gpu_validate_<time>.json (+ the folder gpu_validate_<time>_logs/); a short table,
# then the JSON path, are the last lines printed.
# Python: $PYTHON, else the repository's .venv, else the main checkout's .venv, else python3.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"

DRY=()
case "${1:-}" in
  --dry-run) DRY=(--dry-run) ;;
  "") ;;
  *) echo "usage: bash bench/gpu/validate.sh [--dry-run]" >&2; exit 2 ;;
esac

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  common=$(git rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
  for cand in "$REPO/.venv/bin/python" "${common:+$(dirname "$common")/.venv/bin/python}" python3; do
    if [[ -n "$cand" ]] && command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" 2>/dev/null; then
      PY=$cand
      break
    fi
  done
fi
if [[ -z "$PY" ]]; then
  echo "no Python with torch found: set PYTHON=/path/to/python" >&2
  exit 2
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET  # the driver sets it per step: compiled on the GPU, interpreted in the dry run
# Step logs: beside the JSON in bench/results/, or (with $OUT, where only 8 files come back) in a
# work folder that the driver packs into $OUT/gpu_validate_logs.tar.gz.
STAMP=$(date +%Y%m%d-%H%M%S)
if [[ -n "${OUT:-}" ]]; then LOGS=/tmp/gpu_validate_work; else LOGS="$REPO/bench/results/gpu_validate_${STAMP}_logs"; fi
rm -rf "$LOGS" && mkdir -p "$LOGS"

# Wheels carried in .whl/ (bench/gpu/fetch_wheels.sh): installed into a private folder that only
# the model steps put on their path. The dry run only checks that pip would accept them for
# CPython 3.12 on x86_64 (installing them here would shadow this machine's torchrec / FBGEMM).
SITE=""
WHEELS_RC=""
WHEELS_LOG="$LOGS/wheels.log"
shopt -s nullglob
wheels=(.whl/*.whl)
if (( ${#wheels[@]} )); then
  if (( ${#DRY[@]} )); then
    check=$(mktemp -d)
    "$PY" -m pip install --dry-run --no-index --no-deps --target "$check" --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --only-binary=:all: "${wheels[@]}" >"$WHEELS_LOG" 2>&1
    WHEELS_RC=$?
    rm -rf "$check"
  else
    SITE=/tmp/site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
      >"$WHEELS_LOG" 2>&1
    WHEELS_RC=$?
  fi
  { echo "rc=$WHEELS_RC"; ls -l "${wheels[@]}"; } >>"$WHEELS_LOG"
  echo "wheels: ${#wheels[@]} from .whl/, pip rc=$WHEELS_RC (log: $WHEELS_LOG)"
else
  echo "wheels: no .whl/ folder (the model steps will report what they cannot import)" >"$WHEELS_LOG"
  echo "wheels: none in .whl/"
fi

exec "$PY" bench/gpu/validate.py "${DRY[@]}" --stamp "$STAMP" --work "$LOGS" --site "$SITE" --wheels-log "$WHEELS_LOG" \
  --wheels-rc "$WHEELS_RC"
