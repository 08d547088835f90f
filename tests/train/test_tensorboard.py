"""TensorBoard scalars of a training run, read back with TensorBoard's own event reader: they are the
numbers of train_log.jsonl, step for step, also after a resume that replays steps a killed run logged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto.event_pb2 import SessionLog

from recsys.errors import InputError
from recsys.train.config import RunConfig, register_configs
from recsys.train.loop import train
from recsys.train.tensorboard import TensorBoardLog

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
register_configs()
COMMON = ("train.log_every=1", "train.optim.lr_decay=constant", "train.optim.warmup_steps=3",
          "train.eval_max_batches=2")


def run_config(tmp_path: Path, out: str, *overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[
            "data=tiny", "model=debug", f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / out}",
            "train.progress=false", *COMMON, *overrides])
    return OmegaConf.to_object(cfg)


def log_curves(out: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value)]}`` from train_log.jsonl: training keys as ``train/<key>``, ``valid_<m>`` as
    ``valid/<m>``, numbers only."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for key, value in rec.items():
            if key in ("step", "epoch", "batch", "world_size") or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            tag = "valid/" + key[len("valid_"):] if key.startswith("valid_") else "train/" + key
            curves.setdefault(tag, []).append((rec["step"], float(value)))
    return curves


def board_curves(path: Path, purge: bool = True) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value)]}`` as TensorBoard loads them from an event directory (or one file)."""
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0}, purge_orphaned_data=purge)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_same_curves(board: dict, log: dict) -> None:
    assert sorted(board) == sorted(log)
    for tag, points in log.items():
        assert [s for s, _ in board[tag]] == [s for s, _ in points], tag
        assert [v for _, v in board[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32


def test_scalars_are_the_train_log_numbers(tmp_path):
    out = tmp_path / "run"
    train(run_config(tmp_path, "run", "train.max_steps=4", "train.eval_every=2"))
    log, board = log_curves(out), board_curves(out / "tensorboard")
    assert [s for s, _ in log["train/loss"]] == [1, 2, 3, 4]
    assert {"train/lr", "train/samples_per_s", "valid/auc", "valid/logloss"} <= set(log)
    assert [s for s, _ in log["valid/auc"]] == [2, 4]
    assert_same_curves(board, log)


def test_resumed_run_shows_each_step_once(tmp_path):
    out = tmp_path / "run"
    train(run_config(tmp_path, "run", "train.max_steps=7", "train.checkpoint_every=5"))
    # As if the run had been killed after logging step 7 but before its step-7 checkpoint landed.
    for p in (out / "checkpoints").glob("step_7.pt*"):
        p.unlink()
    (first,) = (out / "tensorboard").glob("events.out.tfevents.*")
    report = json.loads(train(run_config(tmp_path, "run", "train.max_steps=9", "train.checkpoint_every=5")).read_text())
    assert report["resumed_from"].endswith("step_5.pt")

    log, board = log_curves(out), board_curves(out / "tensorboard")
    assert [s for s, _ in log["train/loss"]] == list(range(1, 10))  # trim_log dropped the replayed 6, 7
    assert_same_curves(board, log)
    # The case is real: the killed run's file holds steps 6 and 7, which the resumed run logged again ...
    assert [s for s, _ in board_curves(first, purge=False)["train/loss"]] == list(range(1, 8))
    # ... and the resumed writer hides them by opening with purge_step = 6 (a SessionLog START at step 6).
    (second,) = set((out / "tensorboard").glob("events.out.tfevents.*")) - {first}
    starts = [e.step for e in EventFileLoader(str(second)).Load()
              if e.HasField("session_log") and e.session_log.status == SessionLog.START]
    assert starts == [6]


def test_tensorboard_false_writes_no_event_file(tmp_path):
    out = tmp_path / "run"
    train(run_config(tmp_path, "run", "train.max_steps=2", "train.tensorboard=false"))
    assert (out / "train_log.jsonl").is_file() and not (out / "tensorboard").exists()


def test_missing_tensorboard_package_is_refused_before_any_work(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith(("tensorboard.", "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError
    with pytest.raises(InputError, match=r"train\.tensorboard=true needs the tensorboard package .*"
                                         r"train\.tensorboard=false"):
        train(run_config(tmp_path, "run", "train.max_steps=2"))
    assert not (tmp_path / "data").exists() and not (tmp_path / "run" / "train_log.jsonl").exists()
    TensorBoardLog(tmp_path / "off", enabled=False).open(0)  # disabled: no import, no directory
    assert not (tmp_path / "off").exists()


def test_a_resumed_writer_sorts_after_the_earlier_event_files(tmp_path):
    """Event files sort by name and, within one second and one process, by an unpadded counter ("...9" after
    "...10"): before a resumed writer opens, the clock is past every earlier file's second, so its file sorts last
    and its purge_step hides the replayed steps of the earlier files, not its own."""
    import time

    from recsys.train.tensorboard import wait_for_a_later_second

    now = int(time.time())
    (tmp_path / f"events.out.tfevents.{now:010d}.host.42.9").write_bytes(b"")
    wait_for_a_later_second(tmp_path)
    assert int(time.time()) > now
    later = f"events.out.tfevents.{int(time.time()):010d}.host.42.10"
    assert sorted([later, f"events.out.tfevents.{now:010d}.host.42.9"])[-1] == later
    t0 = time.perf_counter()
    wait_for_a_later_second(tmp_path / "empty")  # no event file: no wait
    assert time.perf_counter() - t0 < 0.05
