"""Serving tests run tiny models: one intra-op thread is faster than two there, and much faster on a
loaded machine, where every parallel op waits for a descheduled thread. Restored after each test."""

import pytest

from recsys.testing import torch_threads


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield
