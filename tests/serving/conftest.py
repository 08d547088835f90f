"""Serving tests run tiny models: one intra-op thread is faster than two there, and much faster on a
loaded machine, where every parallel op waits for a descheduled thread. Restored after each test.

Session fixtures of the job tests: the tiny dataset + a random ranker checkpoint (``trained``), and one
uninterrupted in-process scoring run of its test split (``baseline``), the reference of every
kill / resume / multi-process test."""

import json
import sys
from pathlib import Path

import pytest

from recsys.testing import torch_threads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from job_fixtures import make_checkpoint, score_config, tiny_data_config  # noqa: E402

from recsys.serving.job import run_scoring  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(tmp dir, checkpoint file) of a random debug-sized ranker on the tiny dataset."""
    tmp = tmp_path_factory.mktemp("score")
    data_cfg = tiny_data_config(tmp / "data")
    ckpt = make_checkpoint(tmp / "run", data_cfg)
    return tmp, ckpt


@pytest.fixture(scope="session")
def baseline(trained):
    """An uninterrupted run (in-process, one thread), given the training output dir rather than the file."""
    tmp, ckpt = trained
    out = tmp / "uninterrupted"
    with torch_threads(1):
        summary = json.loads(run_scoring(score_config(ckpt.parent.parent, out)).read_text())
    return out, summary
