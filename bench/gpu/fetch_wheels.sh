#!/usr/bin/env bash
# Download the small wheels that the GPU image lacks into .whl/ (git-ignored), for Python 3.12
# x86_64, so that `bash bench/gpu/validate.sh` can install them there with --no-index.
#
#   bash bench/gpu/fetch_wheels.sh          # then launch with carry: [".whl"]
#
# The GPU image ('cuda': Python 3.12, torch 2.11.0+cu130, triton 3.6.0) has no torchrec,
# fbgemm-gpu, polars, hydra-core, omegaconf or tensordict and cannot download anything.
# What is fetched and why (pins match torch 2.11: FBGEMM/TorchRec 1.6 are the 2.11 releases):
#   fbgemm-gpu-cpu 1.6.0   CPU build of FBGEMM (~6 MB; the CUDA build is far too large to carry):
#                          makes `import fbgemm_gpu` / torchrec work; its ops have no CUDA kernels
#   torchrec 1.6.1         KeyedJaggedTensor / EmbeddingBagCollection, imported by the model
#   tensordict, pyvers    imported by `import torchrec` (cloudpickle, also needed, is on the image)
#   hydra-core, omegaconf, antlr4-python3-runtime   the config stack (small)
# Not fetched: polars (its runtime wheel is ~54 MB, too much for the 64 MiB carry; the benches
# that run on the GPU do not import it).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.whl
PY=${PYTHON:-python3}
WHEELS=(
  fbgemm-gpu-cpu==1.6.0
  torchrec==1.6.1
  tensordict==0.15.3
  pyvers==0.2.3
  hydra-core==1.3.8
  omegaconf==2.3.1
)
# omegaconf 2.3 pins antlr4-python3-runtime 4.9.*, which PyPI has as an sdist only: build its
# (pure-Python) wheel here, the GPU machine cannot build anything without network.
SDIST_ONLY=(antlr4-python3-runtime==4.9.3)
mkdir -p "$DEST"
for spec in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$spec" 2>&1 | grep -v "is ignored: it is neither" || true
  name=${spec%%==*}
  ls "$DEST" | grep -qi "^${name//-/_}-" || { echo "missing wheel for $spec" >&2; exit 1; }
done
for spec in "${SDIST_ONLY[@]}"; do
  "$PY" -m pip wheel -q --no-deps -w "$DEST" "$spec" 2>&1 | grep -v "is ignored: it is neither" || true
  name=${spec%%==*}
  ls "$DEST" | grep -qi "^${name//-/_}-" || { echo "missing wheel for $spec" >&2; exit 1; }
done
echo "wheels in $DEST:"
ls -l "$DEST"/*.whl | awk '{printf "  %8.2f MiB  %s\n", $5 / 1048576, $9}'
du -cb "$DEST"/*.whl | tail -1 | awk '{printf "total: %.2f MiB (the carry limit is 64 MiB with the whole working tree)\n", $1 / 1048576}'
