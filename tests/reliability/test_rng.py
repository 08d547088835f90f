"""Every RNG survives a checkpoint round trip (weights_only); iterating the loader leaves the global RNG alone."""

from __future__ import annotations

import random

import numpy as np
import torch
from fuzz_helpers import valid_tables
from hypothesis import given, settings

from recsys.data.config import LoaderConfig
from recsys.data.loader import RequestLoader
from recsys.reliability.checkpoint import CheckpointManager, load_checkpoint
from recsys.reliability.rng import capture_rng, restore_rng


def draws() -> tuple:
    return random.random(), random.getrandbits(64), float(np.random.standard_normal()), torch.rand(3).tolist()


def test_rng_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draws()
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    path = CheckpointManager(tmp_path).save(1, {"rng": capture_rng()})
    want = draws()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng(load_checkpoint(path)["rng"])
    assert draws() == want
    restore_rng({"torch": torch.get_rng_state()})  # old checkpoints: torch only


@settings(max_examples=3, deadline=None, database=None)
@given(valid_tables(min_rows=3))
def test_loader_iteration_does_not_touch_the_global_torch_rng(tmp_path_factory, case):
    import pyarrow.parquet as pq

    schema, table = case
    path = tmp_path_factory.mktemp("rng") / "part.parquet"
    pq.write_table(table, path, row_group_size=2)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for epoch in (0, 1):
        list(RequestLoader([path], schema, LoaderConfig(batch_size=2, shuffle=True), epoch=epoch))
    assert torch.equal(torch.get_rng_state(), before)
