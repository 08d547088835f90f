"""``torchrun -m recsys.train`` ranks SIGKILLed between checkpoints, then resumed: bit-exact (gloo, CPU).

Apart from the other real-command tests (test_distributed_cli.py) so that the two long files run on two
test workers.
"""

from __future__ import annotations

import json

import pytest
import torch
from dist_runs import torchrun

from recsys.reliability.checkpoint import CheckpointManager, load_checkpoint


def test_sigkill_between_checkpoints_under_two_ranks_then_resume_is_bit_exact(tmp_path):
    """``torchrun -m recsys.train`` runs (the killed one under the real launcher, the others forked with its
    environment): every rank SIGKILLs itself after its 5th step (fault point ``train.after_step``, checkpoint at 3); the restart resumes the DCP checkpoint (each rank's RNG, the global
    popularity counts) and ends with the same report, log and weights as an uninterrupted run, bit for bit."""
    args = ["-m", "recsys.train", "dist=gloo", "dist.sharding=row_wise", "model=debug", "model.attention_backend=torch",
            "data=tiny", f"data.root={tmp_path / 'data'}", "train.progress=false", "train.log_every=1",
            "train.checkpoint_every=3", "train.max_steps=8", "train.optim.warmup_steps=3",
            "train.optim.lr_decay=cosine", "data.loader.batch_size=8", "data.loader.shuffle=true"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    torchrun(*args, f"output_dir={straight}")  # also prepares the data the other runs read
    killed = torchrun(*args, f"output_dir={crashed}", fault="train.after_step@5", check=False, launcher="torchrun")
    assert killed.returncode != 0 and "exitcode  : -9" in killed.stderr, killed.stderr[-3000:]
    assert not (crashed / "report.json").exists()
    assert sorted(p.name for p in (crashed / "dist_checkpoints").iterdir()) == ["step_3"]
    torchrun(*args, f"output_dir={crashed}")
    a, b = (json.loads((d / "report.json").read_text()) for d in (straight, crashed))
    assert b["resumed_from"].endswith("dist_checkpoints/step_3") and not a["resumed_from"]
    assert a["steps"] == b["steps"] == 8 and a["world_size"] == b["world_size"] == 2
    a["config"].pop("output_dir"), b["config"].pop("output_dir")
    for key in sorted(set(a) - {"train_samples_per_s", "train_requests_per_s", "train_time_s", "resumed_from"}):
        if key.endswith("gauc"):  # per-user AUCs are summed in polars' group order, which varies run to run
            assert b[key] == pytest.approx(a[key], rel=1e-12, abs=0), key
        else:
            assert b[key] == a[key], key
    logs = [[json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()] for d in (straight, crashed)]
    strip = [[{k: v for k, v in r.items() if k != "samples_per_s"} for r in log] for log in logs]
    assert [r["step"] for r in strip[1]] == list(range(1, 9)) and strip[0] == strip[1]  # every step once, same loss
    fa, fb = (load_checkpoint(CheckpointManager(d / "checkpoints").paths()[-1])["model"] for d in (straight, crashed))
    assert fa.keys() == fb.keys() and any("embeddings" in k for k in fa)
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k
