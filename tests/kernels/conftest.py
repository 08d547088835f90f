"""Test setup for the attention kernels.

On a machine without CUDA the Triton tests run under the Triton interpreter: the root
``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before any test module is imported (setting it
here was too late in a full-suite run, where another folder's tests import the kernels first).
"""

import pytest
import torch


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
