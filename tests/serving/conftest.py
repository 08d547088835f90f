"""Serving tests run tiny models: one intra-op thread is faster than two there, and much faster on a
loaded machine, where every parallel op waits for a descheduled thread. Restored after each test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
