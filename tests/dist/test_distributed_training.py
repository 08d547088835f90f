"""Distributed training on real processes (torchrun, gloo, CPU) against a single process.

* 2 ranks on halves of the same global batches == 1 process on the whole batches (losses and
  final weights), for row-wise and table-wise tables. Why they must agree: see the gradient
  bookkeeping in recsys/dist/wrap.py. The reference is the single-process training math of
  ``recsys.train`` (torchrec ``RowWiseAdagrad`` stepped after backward, AdamW, clipping, the
  same LR schedule); the distributed side uses FBGEMM's fused row-wise Adagrad in backward.
  Tolerance: 1e-5 relative on the loss, 2e-5 absolute on every weight but a few AdamW-amplified
  elements (``dist_runs.assert_weights_match``) -- float32 sums in a different order (all-to-all,
  reduce-scatter, all-reduce), nothing else.
* save at step k with 2 ranks, restart from the DCP checkpoint, continue == uninterrupted run;
  then 1 rank (table-wise) loads the 2-rank (row-wise) checkpoint: DCP reshards, weights bit-equal;
  a resume under another run configuration is refused on every rank.
* a NaN loss on one rank skips the step on both and moves no weight, table or optimizer state; a
  non-finite gradient (finite loss) stops both ranks before the dense step;
* semantic-ID items (the ``sid_table`` sharded too): 2 ranks == 1 process;
* a residual ranker with the listwise loss (``train.loss=listwise``, a per-candidate prior added to the
  logits): 2 ranks == 1 process (the per-rank candidate-share scaling holds for the listwise mean too).

The real ``torchrun -m recsys.train`` commands (refusals, SIGKILL + resume) are in test_distributed_cli.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import dist_scenario as scenario
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))


from dist_runs import assert_weights_match, single_process_reference, torchrun

STEPS = 4


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    return single_process_reference(STEPS)


def test_two_ranks_match_one_process_on_the_same_global_batch(tmp_path, reference):
    shardings = ("row_wise", "table_wise")
    torchrun("match", ",".join(shardings), str(STEPS), str(tmp_path))  # one launch, both plans in turn
    ref_losses, ref_state = reference
    init = scenario.build().state_dict()
    for sharding in shardings:
        got = torch.load(tmp_path / f"dist_{sharding}.pt", weights_only=True)
        plan = got["plan"]
        assert {t["sharding"] for t in plan.values()} == {sharding}, plan
        if sharding == "row_wise":
            assert all(t["ranks"] == [0, 1] for t in plan.values()), plan
        else:  # whole tables, spread over both ranks
            assert all(len(t["ranks"]) == 1 for t in plan.values()), plan
            assert {r for t in plan.values() for r in t["ranks"]} == {0, 1}, plan
        assert got["losses"] == pytest.approx(ref_losses, rel=1e-5), sharding
        moved = [k for k in ref_state if "embeddings" in k]  # the run really moved the tables (rows of both ranks)
        assert moved and all(not torch.equal(ref_state[k], init[k]) for k in moved), moved
        assert_weights_match(got["state"], ref_state, sharding)


def test_two_ranks_match_one_process_with_semantic_id_items(tmp_path):
    """``item_embedding.mode=both``: the ``sid_table`` is sharded under the checked plan like every other table
    (built on meta, fused optimizer), and 2 ranks equal one process, tables and SID table included."""
    shardings = ("row_wise", "table_wise")
    torchrun("match", ",".join(shardings), str(STEPS), str(tmp_path), "sid")
    ref_losses, ref_state = single_process_reference(STEPS, build=scenario.build_sid)
    init = scenario.build_sid().state_dict()
    sid_key = next(k for k in ref_state if k.endswith("sid_table.weight"))
    assert not torch.equal(ref_state[sid_key], init[sid_key])  # the reference moved the SID table
    for sharding in shardings:
        got = torch.load(tmp_path / f"sid_{sharding}.pt", weights_only=True)
        plan = got["plan"]
        assert plan["sid_table"]["sharding"] == sharding and {t["sharding"] for t in plan.values()} == {sharding}
        assert got["losses"] == pytest.approx(ref_losses, rel=1e-5), sharding
        assert_weights_match(got["state"], ref_state, sharding)


def test_two_ranks_match_one_process_with_the_listwise_loss_over_a_prior(tmp_path):
    torchrun("match", "row_wise", str(STEPS), str(tmp_path), "listwise")
    ref_losses, ref_state = single_process_reference(STEPS, listwise=True)
    bce_losses, _ = single_process_reference(STEPS)
    assert ref_losses != pytest.approx(bce_losses, rel=1e-3)  # another loss: the listwise path really ran
    got = torch.load(tmp_path / "listwise_row_wise.pt", weights_only=True)
    assert got["losses"] == pytest.approx(ref_losses, rel=1e-5)
    # A softmax over a request's candidates is blind to a per-task shift of every logit: the output bias's
    # true gradient is 0, its float residue (~1e-9, summed in another order) differs between the runs, and
    # AdamW's m / sqrt(v) turns either residue into a step of the learning rate's size. Every other weight
    # must match; that bias's move is no bookkeeping error.
    shift = "heads.mlp.2.bias"
    assert shift in ref_state
    assert_weights_match({k: v for k, v in got["state"].items() if k != shift},
                         {k: v for k, v in ref_state.items() if k != shift}, "listwise")


def test_resume_from_a_two_rank_checkpoint_continues_the_same_run(tmp_path):
    k, n = 3, 7
    torchrun("resume", "row_wise", str(tmp_path), str(tmp_path / "data"), str(k), str(n))

    def losses(name: str) -> dict[int, float]:
        rows = [json.loads(x) for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    straight, crashed = losses("straight"), losses("crashed")
    assert sorted(straight) == sorted(crashed) == list(range(1, n + 1))
    for step in range(1, n + 1):
        assert crashed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step
    report = json.loads((tmp_path / "crashed" / "report.json").read_text())
    assert report["resumed_from"].endswith(f"step_{k}") and report["steps"] == n and report["world_size"] == 2
    straight_report = json.loads((tmp_path / "straight" / "report.json").read_text())
    assert report["test_auc"] == pytest.approx(straight_report["test_auc"], abs=1e-6)
    # then a resume of "crashed" with another dense_lr: rank 0 compares the checkpoint's config, both ranks refuse
    for rank in (0, 1):
        refused = (tmp_path / f"refused-rank{rank}.txt").read_text()
        assert "is of another run configuration" in refused and "train.optim.dense_lr" in refused, (rank, refused)
        assert f"crashed/dist_checkpoints/step_{n}" in refused, refused
    assert json.loads((tmp_path / "crashed" / "report.json").read_text()) == report  # nothing rewritten

    # Different world size: 1 rank (table-wise) loads the 2-rank (row-wise) checkpoint; DCP reshards the tables.
    shutil.copytree(tmp_path / "straight", tmp_path / "reshard1")
    before = torch.load(tmp_path / "straight" / "checkpoints" / f"step_{n}.pt", weights_only=True)["model"]
    torchrun("resume", "table_wise", str(tmp_path), str(tmp_path / "data"), str(k), str(n), nproc=1)
    after = torch.load(tmp_path / "reshard1" / "checkpoints" / f"step_{n}.pt", weights_only=True)["model"]
    resharded = json.loads((tmp_path / "reshard1" / "report.json").read_text())
    assert resharded["world_size"] == 1 and resharded["resumed_from"].endswith(f"step_{n}")
    assert {t["sharding"] for t in resharded["sharding"].values()} == {"table_wise"}
    assert sorted(after) == sorted(before)
    for key, v in before.items():
        assert torch.equal(after[key], v), key


def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank_and_moves_nothing(tmp_path):
    """The guard decides on the all-reduced loss before backward: the fused table update never runs. A finite
    loss with non-finite gradients cannot be skipped once the fused tables stepped: every rank stops before
    the dense step (docs/reliability.md)."""
    torchrun("nonfinite", str(tmp_path))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"nonfinite-rank{rank}.pt", weights_only=True)
        assert got["skipped"] == "loss", (rank, got)
        assert got["tables"] > 0 and got["keys"] > got["tables"], got  # table shards, accumulators and dense seen
        assert got["unchanged"] and got["sched_unchanged"], (rank, got)
        assert "fused optimizer already applied this step" in got["grad_error"], (rank, got["grad_error"])
        assert got["dense_unchanged"], rank
