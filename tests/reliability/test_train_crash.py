"""Real `python -m recsys.train` processes (``cli_runner``) killed with SIGKILL (between steps and mid checkpoint write),
restarted until done: the final report and weights equal an uninterrupted run's, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from cli_runner import CliProcess, launch_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recsys.data import prepare_dataset
from recsys.reliability.checkpoint import CheckpointManager, load_checkpoint
from recsys.train.config import RunConfig, register_configs

ROOT = Path(__file__).resolve().parents[2]
register_configs()
# shuffle on: the resumed run must also replay the epoch-seeded loader order
ARGS = ["model=debug", "model.attention_backend=torch", "data=tiny", "train.progress=false", "train.epochs=3", "data.loader.batch_size=8",
        "data.loader.shuffle=true", "train.checkpoint_every=4", "train.log_every=1", "train.keep_checkpoints=2",
        "train.optim.warmup_steps=5"]
TIMING_KEYS = {"train_samples_per_s", "train_requests_per_s", "train_time_s", "resumed_from"}


def launch(out: Path, data_root: Path, fault: str | None = None) -> CliProcess:
    """``python -m recsys.train`` in a child process; one thread in every run: same float reductions."""
    return launch_cli("recsys.train", *ARGS, f"data.root={data_root}", f"output_dir={out}",
                      env={"RECSYS_FAULT": fault} if fault else None)


def finish(proc: CliProcess) -> tuple[int, str]:
    """(return code, stdout + stderr)."""
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out + err


def ckpt_steps(out: Path) -> list[int]:
    return [int(p.stem.split("_")[1]) for p in CheckpointManager(out / "checkpoints").paths()]


def assert_checkpoints_sound(out: Path) -> None:
    """Every final-named checkpoint verifies against its digest and loads."""
    for p in CheckpointManager(out / "checkpoints").paths():
        state = load_checkpoint(p)
        assert state["step"] == int(p.stem.split("_")[1])


def loss_log(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash") / "data"
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg: RunConfig = OmegaConf.to_object(compose("train", overrides=[*ARGS, f"data.root={root}"]))
    prepare_dataset(cfg.data, progress=False)  # once, so the concurrent runs below only read it
    return root


def test_sigkill_anywhere_then_resume_equals_uninterrupted(data_root, tmp_path):
    straight_dir, crash_dir = tmp_path / "straight", tmp_path / "crashed"
    straight = launch(straight_dir, data_root)  # runs concurrently with the crash chain

    # 1. external SIGKILL at an arbitrary moment after the second checkpoint
    proc = launch(crash_dir, data_root)
    deadline = time.time() + 120
    while not any(s >= 8 for s in ckpt_steps(crash_dir)):
        assert proc.poll() is None, finish(proc)[1][-3000:]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert finish(proc)[0] == -signal.SIGKILL
    assert not (crash_dir / "report.json").exists(), "the run finished before the kill: not a mid-run kill"
    assert_checkpoints_sound(crash_dir)

    # 2. killed with a torn checkpoint temp file, 3. killed after fsync before the rename:
    # each leaves only sound final-named checkpoints (and a temp file the next run deletes)
    for fault in ("checkpoint.mid_write@2", "checkpoint.before_rename@1"):
        newest = ckpt_steps(crash_dir)[-1]
        rc, err = finish(launch(crash_dir, data_root, fault))
        assert rc == -signal.SIGKILL, (fault, err[-3000:])
        assert f"resumed from {crash_dir / 'checkpoints' / f'step_{newest}.pt'}" in err, (fault, err[-3000:])
        assert list((crash_dir / "checkpoints").glob(".step_*.tmp-*")), f"{fault}: no temp file left"
        assert_checkpoints_sound(crash_dir)
        assert not (crash_dir / "report.json").exists()

    # 5. the last restart runs to the end
    rc, err = finish(launch(crash_dir, data_root))
    assert rc == 0, err[-3000:]
    rc, err = finish(straight)
    assert rc == 0, err[-3000:]

    a = json.loads((straight_dir / "report.json").read_text())
    b = json.loads((crash_dir / "report.json").read_text())
    assert b["resumed_from"] and not a["resumed_from"]
    assert a["steps"] == b["steps"] > 40
    a["config"].pop("output_dir"), b["config"].pop("output_dir")
    for key in sorted(set(a) - TIMING_KEYS):
        if key.endswith("gauc"):  # per-user AUCs are summed in polars' group order, which varies run to run
            assert b[key] == pytest.approx(a[key], rel=1e-12, abs=0), key
        else:
            assert b[key] == a[key], key  # bitwise: AUC, log loss, counts, config, data summary
    # each step logged exactly once (records of killed runs after their checkpoint were trimmed), same losses
    la, lb = loss_log(straight_dir), loss_log(crash_dir)
    assert [s for s, _ in lb] == list(range(1, a["steps"] + 1))
    assert lb == la
    # final weights, optimizer state and RNG identical; temp files cleaned up; keep=2 honoured
    fa = load_checkpoint(CheckpointManager(straight_dir / "checkpoints").paths()[-1])
    fb = load_checkpoint(CheckpointManager(crash_dir / "checkpoints").paths()[-1])
    assert fa["model"].keys() == fb["model"].keys()
    for k in fa["model"]:
        assert torch.equal(fa["model"][k], fb["model"][k]), k
    assert torch.equal(fa["rng"]["torch"], fb["rng"]["torch"])
    assert fa["opt_dense"]["state"].keys() == fb["opt_dense"]["state"].keys()
    for i, st in fa["opt_dense"]["state"].items():
        for name, t in st.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(fb["opt_dense"]["state"][i][name])), (i, name)
    assert not list((crash_dir / "checkpoints").glob(".*tmp*"))
    assert len(ckpt_steps(crash_dir)) == 2
