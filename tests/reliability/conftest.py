"""Reliability tests run single-threaded: the models are tiny, and on a shared 2-core machine OpenMP threads
spinning against other processes cost far more CPU than they save (subprocesses get OMP_NUM_THREADS=1)."""

from __future__ import annotations

import pytest

from recsys.testing import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield
