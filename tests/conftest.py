"""Suite-wide test setup.

Without CUDA, Triton kernels can only run under the Triton interpreter, and Triton decides
that when a kernel is *decorated* (at import of ``kernels.triton_*``). Any test module may be
the first to import them (directly or through torchrec/fbgemm pulling in triton first), so the
flag is set here, in the root conftest that pytest loads before collecting any test module.
``torch.cuda.is_available`` does not create a CUDA context.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
