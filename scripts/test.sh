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
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 "$@"
