"""Test setup for the attention kernels.

On a machine without CUDA the Triton tests run under the Triton interpreter. Triton reads
``TRITON_INTERPRET`` when ``triton.jit`` decorates a kernel, i.e. when ``kernels.triton_*`` is
first imported; ``kernels`` imports those modules lazily (first ``backend="triton"`` call), and
this conftest is imported before any test in this folder runs, so setting the flag here is early
enough. Nothing here touches CUDA (``torch.cuda.is_available`` does not initialise a context).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _single_intra_op_thread():
    """Run these (tiny-shape) tests with one intra-op thread, restored afterwards.

    On this shared 2-core machine, with other jobs running, OpenMP barriers in small ops made a
    5-sequence reference call take ~670 ms with 2 threads vs ~2 ms with 1 (measured).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
