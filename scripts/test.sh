#!/usr/bin/env bash
# Sets up .venv (idempotent) and runs the whole test suite on CPU.
#   bash scripts/test.sh                # everything (what CI runs)
#   bash scripts/test.sh tests/model    # extra args go to pytest
# Triton kernels are tested through the Triton interpreter (tests/kernels sets
# TRITON_INTERPRET=1 itself); compiled-Triton tests skip, saying so, without a GPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
# The layer contract (pyproject.toml [tool.importlinter]): imports point down data -> features/embeddings ->
# model -> {train, serving, evaluate, retrieval}, never back. Fails the run before any test starts.
.venv/bin/lint-imports --no-cache >&2
# One pytest worker per core (pytest-xdist), whole files per worker so module-scoped fixtures (a trained
# checkpoint, a prepared dataset) are built once; one OpenMP thread per worker, since workers x threads
# above the core count makes every parallel op wait for a descheduled thread. RECSYS_TEST_WORKERS=0 runs in one process.
# --no-loadscope-reorder: files go out in collection order, which tests/conftest.py sorts slowest first.
# The worker count is read before OMP_NUM_THREADS is set: GNU nproc honours OMP_NUM_THREADS, so `$(nproc)` after
# the export says 1 and the suite ran on a single worker.
WORKERS="${RECSYS_TEST_WORKERS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"  # the cores this process may use
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 -n "$WORKERS" \
  --dist loadfile --no-loadscope-reorder "$@"
