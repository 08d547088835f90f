#!/usr/bin/env bash
# Creates .venv/ in the repo root and installs the whole stack into it.
#
#   bash scripts/setup.sh          # idempotent: a second run returns in about a second
#
# CPU machine (default): torch==2.13.0 CPU wheel, fbgemm-gpu-cpu==1.8.0, torchrec==1.8.0.
# GPU machine (nvidia-smi lists a GPU): the CUDA builds of torch and fbgemm-gpu instead.
# torchrec 1.8.0 declares a dependency on the CUDA `fbgemm-gpu`, which breaks
# `import fbgemm_gpu` on a CPU machine and shares its folder with fbgemm-gpu-cpu, so
# torchrec is installed with --no-deps and its real dependencies are listed by hand.
# (`pip check` complains about that on CPU: expected, harmless.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  FLAVOR=cuda
else
  FLAVOR=cpu
fi

# The stamp records what was installed; any change to this script or to
# pyproject.toml (or a switch of flavour) triggers a re-install.
STAMP_KEY="$FLAVOR-$(cat "$ROOT/scripts/setup.sh" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
STAMP="$VENV/.recsys-setup-stamp"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_KEY" ]]; then
  exit 0
fi

echo "[setup] installing the $FLAVOR stack into $VENV" >&2
start=$(date +%s)
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
# pip's config on some machines names local index folders that may be absent; drop
# those lines of noise, keep every real error (pipefail keeps pip's exit status).
pipi() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
  | { grep -vE "is ignored: it is neither a file nor a directory|requires fbgemm-gpu, which is not installed|dependency resolver does not currently" || true; } >&2; }
PIP=(pipi)

"${PIP[@]}" --upgrade pip
# Pinned: an open range can resolve to a multi-GB CUDA build on a CPU machine.
"${PIP[@]}" "torch==2.13.0"
if [[ "$FLAVOR" == cuda ]]; then
  "${PIP[@]}" "fbgemm-gpu==1.8.0"
else
  "${PIP[@]}" "fbgemm-gpu-cpu==1.8.0"
fi
"${PIP[@]}" --no-deps "torchrec==1.8.0"
"${PIP[@]}" tensordict "torchmetrics==1.0.3" tqdm pyre-extensions
"${PIP[@]}" triton pyarrow polars hydra-core pytest pytest-benchmark pytest-timeout \
  hypothesis matplotlib ruff
# The project itself, editable, without letting pip re-resolve torch / torchrec.
"${PIP[@]}" --no-deps -e "$ROOT"

"$VENV/bin/python" - <<'PY'
import fbgemm_gpu, polars, pyarrow, torch, torchrec, triton  # noqa: F401  (fail loudly now)
import recsys, kernels  # noqa: F401
print(f"[setup] torch {torch.__version__}, torchrec {torchrec.__version__}, triton {triton.__version__}, "
      f"cuda={torch.cuda.is_available()}")
PY
echo "$STAMP_KEY" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - start )) s" >&2
