"""torchrec's ``TrainPipelineSparseDist`` drives the trainer's steps under 2 real gloo ranks (``dist.pipeline``).

* pipelined == eager on the same global batches from the same initial weights (losses 1e-5 relative,
  every weight 2e-5 absolute: the pipeline only moves batch i+1's copy and input all-to-all into step i),
  and both == one process on the whole batches (the single-process reference of
  test_distributed_training.py), for row-wise and table-wise tables;
* both sparse modules of the tokenizer are really pipelined;
* a NaN loss on one rank under the pipeline skips the step on both ranks and moves no weight, table
  shard, optimizer state or schedule (the guard decides before backward, so the fused table update never
  runs).

The real-command guarantees under the pipeline (bit-exact SIGKILL + resume, DCP resume, refusals) are
test_distributed_training.py's, whose ``torchrun -m recsys.train`` runs use the default
``dist.pipeline=auto``, i.e. ``sparse_dist`` on 2 ranks; ``test_resume_switches_driver`` below crosses them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from dist_runs import assert_weights_match, single_process_reference, torchrun

from recsys.dist.config import DistConfig, Pipeline
from recsys.dist.pipeline import resolve_pipeline
from recsys.errors import InputError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import pipeline_worker  # noqa: E402  (its step counts)


def run_worker(sharding: str, out: Path) -> None:
    torchrun(str(HERE / "pipeline_worker.py"), sharding, str(out))


@pytest.mark.parametrize("sharding", ["row_wise", "table_wise"])
def test_pipelined_steps_equal_eager_steps_and_one_process(tmp_path, sharding):
    run_worker(sharding, tmp_path)
    got = torch.load(tmp_path / f"pipeline_{sharding}.pt", weights_only=True)
    eager, piped = got["eager"], got["pipelined"]
    assert piped["pipelined_modules"] == ["ShardedEmbeddingBagCollection", "ShardedEmbeddingCollection"]
    n = pipeline_worker.NAN_STEP
    for r in (eager, piped):
        assert r["skipped"] == [None] * n + ["loss"] + [None] * (pipeline_worker.STEPS - n - 1), r["skipped"]
    finite = [i for i, s in enumerate(piped["skipped"]) if s is None]
    assert [piped["losses"][i] for i in finite] == pytest.approx([eager["losses"][i] for i in finite], rel=1e-5)
    for key in ("at_ref", "final"):
        assert sorted(piped[key]) == sorted(eager[key])
        for k, v in eager[key].items():
            torch.testing.assert_close(piped[key][k], v, rtol=0, atol=2e-5, msg=f"{sharding} {key}: {k}")
    ref_losses, ref_state = single_process_reference(pipeline_worker.REF_STEPS)
    assert piped["losses"][:pipeline_worker.REF_STEPS] == pytest.approx(ref_losses, rel=1e-5)
    # 2 ranks vs 1 process: the float order of the all-reduce differs, so the parity tests' rule (a few
    # AdamW-amplified elements up to 2e-4); pipelined vs eager above run the same reductions and stay at 2e-5
    assert_weights_match(piped["at_ref"], ref_state, f"{sharding} vs 1 process")
    for rank in (0, 1):
        skip = torch.load(tmp_path / f"skip-rank{rank}.pt", weights_only=True)
        for name in ("eager", "pipelined"):
            found = skip[name]
            assert found["tables"] > 0 and found["keys"] > found["tables"], (rank, name, found)
            assert found["unchanged"] and found["sched_unchanged"], (rank, name, found)


def test_resume_switches_driver(tmp_path):
    """A checkpoint written by pipelined steps resumes under eager ones (and the run ends as the pipelined
    one did, to the float32 tolerance): the drivers write the same checkpoint names."""
    args = ["-m", "recsys.train", "dist=gloo", "dist.sharding=row_wise", "model=debug", "data=tiny",
            f"data.root={tmp_path / 'data'}", "train.progress=false", "train.log_every=1", "train.checkpoint_every=3",
            "train.optim.warmup_steps=3", "data.loader.batch_size=8"]
    torchrun(*args, f"output_dir={tmp_path / 'piped'}", "train.max_steps=6")
    torchrun(*args, f"output_dir={tmp_path / 'switched'}", "train.max_steps=3")
    torchrun(*args, f"output_dir={tmp_path / 'switched'}", "train.max_steps=6", "dist.pipeline=none")

    def losses(name: str) -> dict[int, float]:
        rows = [json.loads(x) for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    a, b = losses("piped"), losses("switched")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [b[s] for s in a] == pytest.approx([a[s] for s in a], rel=1e-5)
    report = json.loads((tmp_path / "switched" / "report.json").read_text())
    assert report["resumed_from"].endswith("dist_checkpoints/step_3") and report["steps"] == 6


def test_pipeline_choice():
    assert resolve_pipeline("auto", 2, 0) == Pipeline.sparse_dist
    assert resolve_pipeline("auto", 1, 0) == Pipeline.none  # one rank: nothing to overlap with
    assert resolve_pipeline("auto", 2, 1000) == Pipeline.none  # hashed ids: the EC would run inline
    assert resolve_pipeline("sparse_dist", 1, 0) == Pipeline.sparse_dist
    assert resolve_pipeline("none", 4, 0) == Pipeline.none
    with pytest.raises(InputError, match="dist.pipeline=sparse_dist needs torchrun ranks"):
        DistConfig(backend="none", pipeline="sparse_dist")
    with pytest.raises(ValueError):
        DistConfig(backend="gloo", pipeline="overlap")
