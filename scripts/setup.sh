#!/usr/bin/env bash
# Creates .venv/ in the repo root and installs the project with its declared dependencies.
#
#   bash scripts/setup.sh                   # idempotent: a second run returns in about a second
#   VENV=/tmp/recsys-venv bash scripts/setup.sh   # another venv location (a fresh-install check)
#
# What is installed is pyproject.toml's: [project] dependencies, plus the `cpu` extra
# (fbgemm-gpu-cpu) or, where nvidia-smi lists a GPU, the `cuda` extra (fbgemm-gpu), plus `dev`
# (pytest, ruff, ...). One dependency is dropped on purpose: torchrec 1.8.0 declares the CUDA
# `fbgemm-gpu`, which breaks `import fbgemm_gpu` on a CPU machine and shares its folder with
# fbgemm-gpu-cpu (uninstalling it later removes both). pip cannot drop a dependency, so:
#   1. every declared requirement except torchrec goes in with pip's normal resolution (pip's own
#      config picks the local CPU torch wheel: torch==2.13.0 is pinned in pyproject.toml);
#   2. torchrec (pinned in pyproject.toml) with --no-deps: its real dependencies are declared
#      in pyproject.toml beside it, so step 1 already installed them;
#   3. the project itself, editable, with --no-deps.
# The same three steps serve the cuda flavour (there the extra supplies the fbgemm-gpu torchrec
# wants). pip rather than uv: it honours this machine's pip config (local wheel folder, extra
# indexes) with nothing to translate. `pip check` complains that torchrec wants fbgemm-gpu on CPU:
# expected, harmless.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
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
# The requirement lists, read from pyproject.toml: line 1 is torchrec's pin, one requirement a line after it.
mapfile -t REQS < <("$VENV/bin/python" - "$ROOT/pyproject.toml" "$FLAVOR" <<'PY'
import re, sys
try:
    import tomllib
except ImportError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project["optional-dependencies"]
reqs = project["dependencies"] + extras[sys.argv[2]] + extras["dev"]
is_torchrec = [re.match(r"[A-Za-z0-9._-]+", r).group(0).lower() == "torchrec" for r in reqs]
assert sum(is_torchrec) == 1, "pyproject.toml must list torchrec exactly once"
print(*[r for r, t in zip(reqs, is_torchrec) if t], *[r for r, t in zip(reqs, is_torchrec) if not t], sep="\n")
PY
)
# (a failure inside the process substitution does not stop the script: check its output instead)
[[ ${#REQS[@]} -gt 1 && "${REQS[0]}" == torchrec* ]] || { echo "[setup] cannot read pyproject.toml" >&2; exit 1; }
"${PIP[@]}" "${REQS[@]:1}"
"${PIP[@]}" --no-deps "${REQS[0]}"
"${PIP[@]}" --no-deps -e "$ROOT"

"$VENV/bin/python" - <<'PY'
import fbgemm_gpu, polars, pyarrow, tensorboard, torch, torchrec, triton  # noqa: F401  (fail loudly now)
import kernels  # noqa: F401
from recsys.configs import CONFIG_DIR
assert (CONFIG_DIR / "train.yaml").is_file(), f"no Hydra config tree under {CONFIG_DIR}"
print(f"[setup] torch {torch.__version__}, torchrec {torchrec.__version__}, triton {triton.__version__}, "
      f"cuda={torch.cuda.is_available()}")
PY
echo "$STAMP_KEY" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - start )) s" >&2
