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
#   2+3 are one call. The same steps serve the cuda flavour (there the extra supplies the fbgemm-gpu
# torchrec wants). `pip check` complains that torchrec wants fbgemm-gpu on CPU: expected, harmless.
#
# The installer is uv (parallel downloads, unpacking and byte-compiling: a fresh install in a fraction
# of pip's time), itself installed into the venv by pip. Byte-compiling at install (--compile-bytecode,
# 8-14 s more of a fresh setup on 2 cores) is not optional where PYTHONDONTWRITEBYTECODE is set (this
# machine, CI): without the .pyc files every process compiles torch and torchrec from source again, 27 s
# instead of 10 s to import the scoring job, in every CLI run and every test worker. uv reads no pip config,
# so the machine's pip config (`pip config list`: find-links, index-url, extra-index-url, constraint,
# cert; files and PIP_* variables) is handed to it as flags, with pip's choice among several indexes
# (the best version wherever it lies: the local CPU torch wheel, 2.13.0+cpu, beats PyPI's 2.13.0);
# local folders that do not exist are dropped, as pip ignores them. uv runs with --no-config: the
# [tool.uv] override in pyproject.toml (for a plain `uv pip install .`) would also drop the cuda
# extra's fbgemm-gpu. RECSYS_INSTALLER=pip installs with pip alone, and pip is the fall-back where
# uv cannot be installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
UV_VERSION=0.13.8

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
uvi() { env "${UV_ENV[@]}" "$VENV/bin/uv" pip install --no-config --compile-bytecode --python "$VENV/bin/python" -q "${UV_OPTS[@]}" "$@"; }

INSTALLER="${RECSYS_INSTALLER:-uv}"
if [[ "$INSTALLER" == uv ]] && ! pipi "uv==$UV_VERSION"; then
  echo "[setup] cannot install uv==$UV_VERSION: installing with pip" >&2
  INSTALLER=pip
fi
if [[ "$INSTALLER" == uv ]]; then
  # pip's effective config as uv flags, one a line (see the header), and its CA bundle for uv's TLS
  UV_OPTS=() UV_ENV=()
  while IFS= read -r line; do
    if [[ "$line" == SSL_CERT_FILE=* ]]; then UV_ENV+=("$line"); else UV_OPTS+=("$line"); fi
  done < <("$VENV/bin/python" - <<'PY'
import ast, os, subprocess, sys
from urllib.parse import unquote, urlparse
listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
conf: dict[str, list[str]] = {}
for line in listing.splitlines():
    key, sep, value = line.partition("=")
    if sep:
        conf.setdefault(key.rsplit(".", 1)[-1], []).extend(ast.literal_eval(value).split())
def present(loc: str) -> bool:  # pip ignores a local folder that does not exist; uv would fail
    if "://" not in loc:
        return os.path.exists(loc)
    url = urlparse(loc)
    return url.scheme != "file" or os.path.exists(unquote(url.path))
flags = ["--index-strategy", "unsafe-best-match"]  # pip's rule: the best version on any index
for key, flag in (("index-url", "--index-url"), ("extra-index-url", "--extra-index-url"),
                  ("find-links", "--find-links"), ("constraint", "--constraint")):
    for loc in dict.fromkeys(conf.get(key, [])):  # unique, in order
        if present(loc):
            flags += [flag, loc]
print(*flags, sep="\n")
for cert in conf.get("cert", [])[-1:]:
    if "SSL_CERT_FILE" not in os.environ and os.path.isfile(cert):
        print(f"SSL_CERT_FILE={cert}")
PY
)
  [[ ${#UV_OPTS[@]} -ge 2 ]] || { echo "[setup] cannot read pip's config" >&2; exit 1; }
  PIP=(uvi)
else
  PIP=(pipi)
  "${PIP[@]}" --upgrade pip
fi
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
"${PIP[@]}" --no-deps "${REQS[0]}" -e "$ROOT"

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
