"""``train.early_stopping``: the stop step and the best value follow from the validation records alone (a
replay of train_log.jsonl), the counters survive a resume, and a wrong metric is a clear error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_runs import run_config

from recsys.errors import InputError
from recsys.testing import torch_threads
from recsys.train.config import EarlyStoppingConfig
from recsys.train.early_stopping import EarlyStopper
from recsys.train.loop import train


def replay(values: list[float], patience: int, higher: bool = True) -> tuple[float, int, int | None]:
    """(best, its 1-based position, 1-based position of the stop or None): the rule written out plainly."""
    best, at, bad = None, None, 0
    for i, v in enumerate(values, start=1):
        if best is None or (v > best if higher else v < best):
            best, at, bad = v, i, 0
        else:
            bad += 1
            if bad >= patience:
                return best, at, i
    return best, at, None


@pytest.mark.parametrize("mode", ["max", "min"])
def test_stopper_follows_the_rule(mode):
    seqs = [[0.5, 0.6, 0.55, 0.6, 0.59, 0.7], [0.3, 0.2, 0.1, 0.05], [0.4], [0.1, 0.1, 0.1]]
    for values in seqs:
        for patience in (1, 2, 3):
            s = EarlyStopper(EarlyStoppingConfig("valid_auc", patience, mode))
            for i, v in enumerate(values, start=1):
                s.update({"valid_auc": v}, step=10 * i)
                if s.stopped:
                    break
            best, at, stop = replay(values, patience, mode == "max")
            assert (s.best, s.best_step, s.stopped_at) == (best, 10 * at, None if stop is None else 10 * stop)


def test_refusals():
    s = EarlyStopper(EarlyStoppingConfig("valid_recall@10", 2))
    with pytest.raises(InputError, match=r"valid_recall@10.*not among.*\['valid_auc'\]"):
        s.update({"valid_auc": 0.7}, 5)
    s = EarlyStopper(EarlyStoppingConfig("valid_gauc", 2))
    with pytest.raises(InputError, match="undefined"):
        s.update({"valid_gauc": None}, 5)
    with pytest.raises(InputError, match="patience"):
        EarlyStoppingConfig("valid_auc", 0)
    with pytest.raises(InputError, match="eval_every"):
        run_config(Path("/tmp"), "x", "train.early_stopping.metric=valid_auc")


@pytest.mark.parametrize("restore", [True, False])
def test_training_stops_where_the_log_says_and_a_resume_adds_no_step(tmp_path, restore):
    args = ("train.eval_every=1", "train.epochs=20", "train.early_stopping.metric=valid_logloss",
            "train.early_stopping.mode=min", "train.early_stopping.patience=2", "train.optim.dense_lr=0.05",
            "train.log_every=1", f"train.early_stopping.restore_best={str(restore).lower()}")
    with torch_threads(1):
        report = json.loads(train(run_config(tmp_path, "run", *args)).read_text())
    rows = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    valid = [(r["step"], r["valid_logloss"]) for r in rows if "valid_logloss" in r]
    best, at, stop = replay([v for _, v in valid], 2, higher=False)
    es = report["early_stopping"]
    planned = 20 * math.ceil(report["data"]["splits"]["train"]["requests"] / 16)  # 20 epochs of batch 16
    assert stop is not None, "a lr this high should plateau within 20 epochs"
    assert es["best"] == pytest.approx(best) and es["best_step"] == valid[at - 1][0]
    assert es["stopped_at_step"] == valid[stop - 1][0] == report["steps"] == valid[-1][0]
    assert report["steps"] < planned
    assert valid[-1][1] != pytest.approx(best)  # so the two weight sets below are told apart
    # the report validates the final checkpoint's weights: the best step's with restore_best, else the stop step's
    assert report["valid_logloss"] == pytest.approx(best if restore else valid[-1][1], rel=1e-5)
    assert (tmp_path / "run" / "best_weights.pt").exists() == restore
    with torch_threads(1):  # resumed from the final checkpoint: already stopped, nothing more is trained
        again = json.loads(train(run_config(tmp_path, "run", *args)).read_text())
    assert again["steps"] == report["steps"] and again["early_stopping"] == es
    assert again["valid_logloss"] == pytest.approx(report["valid_logloss"], rel=1e-6)
    assert es["restored_best"] == restore


def test_best_weights_are_restored_when_training_ends_without_a_stop(tmp_path):
    """Patience never reached (2 epochs, patience 50): the final checkpoint still holds the best validation's
    weights, re-written when a periodic checkpoint had been saved at the last step already."""
    steps = 2 * math.ceil(275 / 16)  # the tiny train split: 275 requests, batch 16
    args = ("train.eval_every=2", "train.epochs=2", "train.early_stopping.metric=valid_logloss",
            "train.early_stopping.mode=min", "train.early_stopping.patience=50", "train.optim.dense_lr=0.05",
            f"train.checkpoint_every={steps}")
    with torch_threads(1):
        report = json.loads(train(run_config(tmp_path, "run", *args)).read_text())
    rows = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    valid = [(r["step"], r["valid_logloss"]) for r in rows if "valid_logloss" in r]
    best_step, best = min(valid, key=lambda sv: sv[1])
    es = report["early_stopping"]
    assert report["steps"] == steps and es["stopped_at_step"] is None
    assert es["best_step"] == best_step != steps and es["restored_best"]
    assert report["valid_logloss"] == pytest.approx(best, rel=1e-5)
    final = torch.load(tmp_path / "run" / "checkpoints" / f"step_{steps}.pt", weights_only=False)["model"]
    kept = torch.load(tmp_path / "run" / "best_weights.pt", weights_only=False)
    assert kept["step"] == best_step and final.keys() == kept["model"].keys()
    for name, value in kept["model"].items():  # the checkpoint scoring reads holds the best weights
        assert torch.equal(final[name], value), name


def test_fresh_run_moves_the_best_weights_and_the_retriever_artifact_aside(tmp_path):
    """train.fresh_run moves every output of the earlier run, never deletes or overwrites one: best_weights.pt
    (early stopping) and a two-tower's retriever/ artifact too."""
    args = ("model=two_tower", "train.max_steps=4", "train.eval_every=2", "train.early_stopping.metric=valid_recall@10")
    with torch_threads(1):
        train(run_config(tmp_path, "run", *args))
    run = tmp_path / "run"
    old = {p.relative_to(run): p.read_bytes() for p in [run / "best_weights.pt", *(run / "retriever").rglob("*")]
           if p.is_file()}
    assert any(p.parts[0] == "retriever" for p in old)
    with torch_threads(1):
        train(run_config(tmp_path, "run", *args, "train.fresh_run=true", "train.seed=1"))
    (previous,) = run.glob("previous-*")
    assert {rel: (previous / rel).read_bytes() for rel in old} == old  # the earlier run's files, byte for byte
    assert (run / "best_weights.pt").exists() and (run / "retriever").is_dir()  # the new run's own
