"""Numerical guard: a NaN/Inf loss or gradient skips the step (no dense, sparse, optimizer-state or scheduler
update), is counted in report.json, and too many in a row stop training with a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import recsys.train.loop as loop
import recsys.train.step as step
from recsys.reliability.checkpoint import CheckpointManager, load_checkpoint
from recsys.reliability.guards import NonFiniteGuard, grads_finite
from recsys.train.config import RunConfig, register_configs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
register_configs()


def run_config(root: Path, out: Path, *overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["data=tiny", "model=debug", f"data.root={root}", f"output_dir={out}",
                                          "train.progress=false", "train.log_every=1", "train.epochs=1",
                                          "model.attention_backend=torch", *overrides])
    return OmegaConf.to_object(cfg)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nonfinite") / "data"


class Injector:
    """Wraps multitask_bce: on chosen calls (0-based) the loss is NaN ("loss") or, with a finite loss,
    every gradient becomes NaN ("grad"); snapshots all parameters (dense and embedding tables) at each call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, bad: dict[int, str]) -> None:
        self.bad, self.calls, self.snapshots = bad, 0, []
        self.model: torch.nn.Module | None = None
        real_build, real_bce = loop.build_trainable, step.multitask_bce

        def build(*a, **kw):
            self.model = real_build(*a, **kw)
            return self.model

        def bce(logits, labels, weights=None):
            k = self.calls
            self.calls += 1
            self.snapshots.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
            loss, per_task = real_bce(logits, labels, weights)
            if self.bad.get(k) == "loss":
                return loss * float("nan"), per_task
            if self.bad.get(k) == "grad":
                logits.register_hook(lambda g: g * float("inf"))  # finite loss, inf*0 / inf grads downstream
            return loss, per_task

        monkeypatch.setattr(loop, "build_trainable", build)
        monkeypatch.setattr(step, "multitask_bce", bce)


def same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_steps_are_skipped_and_counted(data_root, tmp_path, monkeypatch):
    inj = Injector(monkeypatch, {2: "loss", 3: "grad", 4: "loss", 9: "grad"})
    cfg = run_config(data_root, tmp_path / "run", "train.max_consecutive_nonfinite=3", "train.max_steps=8")
    report = json.loads(loop.train(cfg).read_text())
    assert report["nonfinite_loss_steps"] == 2 and report["nonfinite_grad_steps"] == 2
    assert report["nonfinite_skipped_steps"] == 4 and report["nonfinite_longest_run"] == 3
    assert report["steps"] == 8 and inj.calls == 12  # every batch but the skipped ones updated
    # the three skipped steps in a row changed no parameter, dense or embedding table ...
    assert any("embeddings" in n for n in inj.snapshots[2])
    assert same_params(inj.snapshots[2], inj.snapshots[5]) and same_params(inj.snapshots[9], inj.snapshots[10])
    # ... while ordinary steps do (the check above can fail)
    assert not same_params(inj.snapshots[1], inj.snapshots[2])
    # optimizer and scheduler stepped once per applied update only
    state = load_checkpoint(CheckpointManager(tmp_path / "run" / "checkpoints").paths()[-1])
    assert state["sched"]["last_epoch"] == report["steps"]
    assert {float(s["step"]) for s in state["opt_dense"]["state"].values()} == {float(report["steps"])}
    assert state["nonfinite"]["skipped_loss"] == 2
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    skips = [r for r in log if "skipped" in r]
    assert [(r["batch"], r["skipped"]) for r in skips] == [(2, "nonfinite_loss"), (3, "nonfinite_grad"),
                                                            (4, "nonfinite_loss"), (9, "nonfinite_grad")]
    assert all(torch.isfinite(p).all() for p in state["model"].values())


def test_too_many_in_a_row_stops_with_a_clear_error(data_root, tmp_path, monkeypatch):
    Injector(monkeypatch, {k: "loss" for k in range(3, 100)})
    cfg = run_config(data_root, tmp_path / "run", "train.max_consecutive_nonfinite=2")
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 4 \(epoch 0, batch 5\): 3 step\(s\) "
                                                 r"in a row skipped.*max_consecutive_nonfinite=2"):
        loop.train(cfg)


def test_zero_tolerance_stops_at_the_first(data_root, tmp_path, monkeypatch):
    Injector(monkeypatch, {1: "grad"})
    cfg = run_config(data_root, tmp_path / "run", "train.max_consecutive_nonfinite=0")
    with pytest.raises(FloatingPointError, match=r"non-finite gradient at step 2 \(epoch 0, batch 1\)"):
        loop.train(cfg)


def test_guard_unit():
    p = torch.nn.Parameter(torch.ones(3))
    assert grads_finite([p])  # no grad yet
    for bad in (float("nan"), float("inf"), -float("inf")):
        p.grad = torch.tensor([0.0, bad, 1.0])
        assert not grads_finite([p])
    p.grad = torch.tensor([0.0, 3e38, -3e38])  # huge but finite: a 2-norm would overflow, max-abs does not
    assert grads_finite([p])
    g = NonFiniteGuard(1)
    g.skip("loss", step=1, epoch=0, batch=0, value=float("nan"))
    g.ok()
    g.skip("grad", step=2, epoch=0, batch=2)
    with pytest.raises(FloatingPointError):
        g.skip("grad", step=2, epoch=0, batch=3)
    h = NonFiniteGuard(1)
    h.load_state_dict(g.state_dict())
    assert h.report() == g.report() == {"nonfinite_skipped_steps": 3, "nonfinite_loss_steps": 1,
                                        "nonfinite_grad_steps": 2, "nonfinite_longest_run": 2}
    with pytest.raises(ValueError, match="cause"):
        g.skip("other", step=0, epoch=0, batch=0)
