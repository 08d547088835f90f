"""Tables built on the meta device, materialised shard by shard: the same model as the plain full build.

* ``SeededTableInit`` (recsys/embeddings/seeded_init.py): any row/column range of a table gets the
  values of the full table, which is by definition the concatenation of its seeded blocks (the slow
  reference); random ranges and the edges (one row, block boundaries, the last partial block, tables
  smaller than a block, all-zero tables).
* ``build_meta_model`` vs ``build_model`` under one seed: same keys and shapes, dense weights equal, the
  global RNG left in the same state, and the tables' ``init_fn`` reproduces the plain tables.
* 2 real gloo ranks (tests/dist/worker.py ``meta``), row-wise and table-wise, on an item table of 9,001
  rows: every rank's initial shards equal the plain model's rows there, for the meta path and the old
  full-model path; training from either gives bit-equal losses and weights, and matches one process
  (the tolerances of test_distributed_training.py).
"""

from __future__ import annotations

import math

import dist_scenario as scenario
import pytest
import torch
from dist_runs import single_process_reference, torchrun

from recsys.dist.meta_init import meta_tensors
from recsys.embeddings.seeded_init import BLOCK_ROWS, SeededTableInit, builds_tables, seeded_init

STEPS = 4
SHARDINGS = ("row_wise", "table_wise")


def reference_table(init: SeededTableInit, n: int, d: int) -> torch.Tensor:
    """The definition: the table's seeded blocks, stacked, cut to ``n`` rows."""
    br = min(BLOCK_ROWS, n)
    return torch.cat([init.block(b, br, d) for b in range(math.ceil(n / br))])[:n]


def filled(init: SeededTableInit, r0: int, c0: int, n: int, d: int, num_rows: int, dim: int) -> torch.Tensor:
    out = torch.full((n, d), float("nan"))
    init.fill(out, r0, c0, num_rows, dim)
    return out


@pytest.mark.parametrize("num_rows", [1, 7, BLOCK_ROWS - 1, BLOCK_ROWS, BLOCK_ROWS + 1, 3 * BLOCK_ROWS + 5])
def test_any_part_of_a_table_gets_the_full_tables_values(num_rows):
    dim = 6
    init = SeededTableInit(base_seed=11, table="t", num_rows=num_rows, low=-0.25, high=0.25)
    full = reference_table(init, num_rows, dim)
    assert full.shape == (num_rows, dim) and full.abs().max() <= 0.25 and full.std() > 0
    whole = torch.empty(num_rows, dim)
    assert init(whole) is whole and torch.equal(whole, full)
    g = torch.Generator().manual_seed(num_rows)
    edges = [(0, 1), (num_rows - 1, num_rows), (0, num_rows)] + [
        (max(0, b - 1), min(num_rows, b + 1)) for b in range(BLOCK_ROWS, num_rows, BLOCK_ROWS)]
    randoms = [tuple(sorted(torch.randint(0, num_rows + 1, (2,), generator=g).tolist())) for _ in range(20)]
    for lo, hi in edges + randoms:
        c0 = int(torch.randint(0, dim, (1,), generator=g))
        c1 = int(torch.randint(c0 + 1, dim + 1, (1,), generator=g))
        got = filled(init, lo, c0, hi - lo, c1 - c0, num_rows, dim)
        assert torch.equal(got, full[lo:hi, c0:c1]), (lo, hi, c0, c1)


def test_zero_tables_and_distinct_tables():
    zeros = SeededTableInit(base_seed=3, table="z", num_rows=10, low=0.0, high=0.0)
    assert torch.equal(filled(zeros, 2, 0, 5, 4, 10, 4), torch.zeros(5, 4))
    a, b, c = (SeededTableInit(s, t, 50, -1.0, 1.0) for s, t in ((1, "a"), (1, "b"), (2, "a")))
    ta, tb, tc = (reference_table(x, 50, 4) for x in (a, b, c))
    assert not torch.equal(ta, tb) and not torch.equal(ta, tc)  # seeded per table and per base seed
    assert torch.equal(ta, reference_table(SeededTableInit(1, "a", 50, -1.0, 1.0), 50, 4))


def test_seeded_init_needs_the_constructor_scope():
    with pytest.raises(RuntimeError, match="builds_tables"):
        seeded_init("t", 5)

    class Holder:
        @builds_tables
        def __init__(self) -> None:
            self.init = seeded_init("t", 5)
            torch.rand(100)  # inside the fork: does not move the caller's RNG

    torch.manual_seed(5)
    first = Holder().init
    after = torch.get_rng_state()
    torch.manual_seed(5)
    torch.randint(0, 2**31 - 1, (1,))  # the constructor's one draw
    assert torch.equal(after, torch.get_rng_state())
    assert Holder().init.base_seed != first.base_seed  # the next model gets other tables


def test_meta_build_is_the_plain_model_without_table_memory():
    schema = scenario.META_SCHEMA
    plain = scenario.build(schema).state_dict()  # seeded as build_meta
    rng_plain = torch.get_rng_state()
    meta_model = scenario.build_meta(schema)
    rng_meta = torch.get_rng_state()
    assert torch.equal(rng_plain, rng_meta)  # what is built after the model draws the same numbers
    meta = meta_model.state_dict()
    assert sorted(meta) == sorted(plain)
    on_meta = set(meta_tensors(meta_model))
    emb = meta_model.tokenizer.embeddings
    configs = [*emb.seq_tables.embedding_configs(), *emb.sparse_tables.embedding_bag_configs()]
    assert len(on_meta) == len(configs) >= 5
    for c in configs:
        key = next(k for k in plain if k.endswith(f".{c.name}.weight"))
        assert key in on_meta and meta[key].shape == plain[key].shape
        assert torch.equal(filled(c.init_fn, 0, 0, *plain[key].shape, *plain[key].shape), plain[key]), c.name
    for key, value in meta.items():
        if key not in on_meta:
            assert torch.equal(value, plain[key]), key


@pytest.fixture(scope="module")
def meta_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("meta")
    torchrun("meta", ",".join(SHARDINGS), str(STEPS), str(out))  # one launch: both shardings, both paths
    return out


@pytest.mark.parametrize("sharding", SHARDINGS)
@pytest.mark.parametrize("path", ["meta", "plain"])
def test_every_initial_shard_holds_the_plain_models_rows(meta_run, sharding, path):
    init = scenario.build(scenario.META_SCHEMA).state_dict()
    covered: dict[str, torch.Tensor] = {}
    for rank in (0, 1):
        local = torch.load(meta_run / f"{path}_{sharding}_init_rank{rank}.pt", weights_only=True)
        assert sorted(local) == sorted(init)
        for key, pieces in local.items():
            for offsets, values in pieces:
                if offsets is None:  # replicated (dense) tensor
                    assert torch.equal(values, init[key]), (rank, key)
                    continue
                idx = tuple(slice(o, o + s) for o, s in zip(offsets, values.shape))
                assert torch.equal(values, init[key][idx]), (rank, key, offsets)
                covered.setdefault(key, torch.zeros(init[key].shape, dtype=torch.int64))[idx] += 1
    assert covered and all(bool((c == 1).all()) for c in covered.values())  # every weight in one shard
    assert any(c.shape[0] == scenario.META_SCHEMA.num_items for c in covered.values())


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_training_from_the_meta_build_is_unchanged(meta_run, sharding):
    meta = torch.load(meta_run / f"meta_{sharding}.pt", weights_only=True)
    plain = torch.load(meta_run / f"plain_{sharding}.pt", weights_only=True)
    assert {t["sharding"] for t in meta["plan"].values()} == {sharding} and meta["plan"] == plain["plan"]
    assert meta["losses"] == plain["losses"]  # same shards, same steps: bit-equal
    assert sorted(meta["state"]) == sorted(plain["state"])
    for key, value in plain["state"].items():
        assert torch.equal(meta["state"][key], value), key
    ref_losses, ref_state = single_process_reference(STEPS, scenario.META_SCHEMA)
    assert meta["losses"] == pytest.approx(ref_losses, rel=1e-5)
    for key, value in ref_state.items():
        torch.testing.assert_close(meta["state"][key], value, rtol=0, atol=2e-5, msg=key)
