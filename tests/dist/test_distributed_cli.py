"""The real distributed commands (``torchrun -m recsys.train`` / ``-m recsys.dist`` ranks, gloo, CPU).

* the run-directory rules of ``recsys.train`` on the real command: ``train.resume=false`` into a directory
  with checkpoints, and a directory another process holds, are refused (exit 2 on the ranks, before any
  training), inputs untouched;
* a baseline under N ranks is refused before any work.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from dist_runs import ROOT, assert_refused_on_the_ranks, torchrun
from hostile_helpers import file_digests, hold_lock  # noqa: E402  (one copy of the lock holder)

from recsys.reliability.rundir import LOCK_NAME


def test_dist_cli_refuses_resume_false_over_checkpoints_and_a_locked_dir(tmp_path):
    """Both refusals happen before the dataset is prepared or a step is trained, on rank 0, and reach every
    rank (the job ends; a deadlocked rank would hit the timeout). The lock refusal under the real launcher."""
    old = tmp_path / "old-run"
    (old / "dist_checkpoints" / "step_4").mkdir(parents=True)
    for name in (".metadata", "trainer.pt"):  # what marks a complete DCP checkpoint; never read here
        (old / "dist_checkpoints" / "step_4" / name).write_bytes(b"an earlier run's checkpoint")
    before = file_digests(old)
    args = ["-m", "recsys.dist", "dist=gloo", "model=debug", "data=tiny", f"data.root={tmp_path / 'data'}",
            "train.progress=false", "train.max_steps=2"]
    locked = tmp_path / "locked"
    with hold_lock(locked) as holder, ThreadPoolExecutor(max_workers=2) as pool:
        resume_false = pool.submit(torchrun, *args, f"output_dir={old}", "train.resume=false", check=False)
        in_use = pool.submit(torchrun, *args, f"output_dir={locked}", check=False, launcher="torchrun")
        resume_false, in_use = resume_false.result(), in_use.result()
    assert_refused_on_the_ranks(resume_false, f"output_dir={old} already holds checkpoints",
                                f"step_4 in {old / 'dist_checkpoints'}", "train.fresh_run=true")
    assert {k: v for k, v in file_digests(old).items() if Path(k).name != LOCK_NAME} == before
    assert_refused_on_the_ranks(in_use, f"output_dir={locked} is in use by another process (pid {holder.pid}")
    assert sorted(p.name for p in locked.iterdir()) == [LOCK_NAME]
    assert not (tmp_path / "data").exists()  # refused before the dataset was prepared


def test_a_baseline_under_n_ranks_is_refused_before_any_work(tmp_path):
    """The baselines keep their own torchrec tables, which the distributed strategy does not shard: refused
    by config, before the process group is joined, the output dir claimed or the data prepared."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from recsys.errors import InputError
    from recsys.train.config import register_configs
    from recsys.train.loop import train

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=[
            "model=dlrm", "data=tiny", "dist=gloo", f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}"]))
    with pytest.raises(InputError, match=r"model.arch=dlrm with dist=gloo: distributed training shards the OneTrans"):
        train(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
