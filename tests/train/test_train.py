"""End-to-end training on the tiny synthetic data: learns the planted signal; resume is exact."""

from __future__ import annotations

import json
import math

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tiny_runs import CONFIGS, run_config

from recsys.errors import InputError
from recsys.train.loop import train


def null_auc_sigma(n_pos: int, n_neg: int) -> float:
    """Std of the AUC of a random scorer (Mann-Whitney U under H0)."""
    return math.sqrt((n_pos + n_neg + 1) / (12.0 * n_pos * n_neg))


def test_training_beats_chance_by_a_margin_luck_cannot_explain(tmp_path):
    cfg = run_config(tmp_path, "run", "data.synthetic.num_users=150", "train.epochs=3",
                     "train.optim.dense_lr=0.003")
    report = json.loads(train(cfg).read_text())
    n_rows, n_pos = report["test_rows"], report["test_positives"]
    threshold = 0.5 + 4 * null_auc_sigma(n_pos, n_rows - n_pos)  # P(random >= this) ~ 3e-5
    assert report["test_auc"] > threshold, (report["test_auc"], threshold)
    assert report["test_auc"] < report["oracle_auc"] + 0.05
    for key in ("test_auc", "test_gauc", "test_logloss", "train_samples_per_s", "oracle_auc", "popularity_auc"):
        assert report[key] is not None and math.isfinite(report[key]), key


def test_resume_continues_to_the_same_loss(tmp_path):
    # constant lr: the "crash" is simulated by a shorter max_steps, and a cosine schedule depends on it
    common = ("train.log_every=1", "train.checkpoint_every=5", "train.optim.warmup_steps=3",
              "train.optim.lr_decay=constant")
    straight = json.loads(train(run_config(tmp_path, "a", "train.max_steps=12", *common)).read_text())
    train(run_config(tmp_path, "b", "train.max_steps=5", *common))  # "crash" after step 5
    resumed = json.loads(train(run_config(tmp_path, "b", "train.max_steps=12", *common)).read_text())
    assert resumed["resumed_from"] and resumed["resumed_from"].endswith("step_5.pt")
    assert resumed["steps"] == straight["steps"] == 12

    def losses(out: str) -> dict[int, float]:
        rows = [json.loads(x) for x in (tmp_path / out / "train_log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    a, b = losses("a"), losses("b")
    assert sorted(b) == list(range(1, 13))
    for step in range(6, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    for key in ("test_auc", "test_logloss", "popularity_auc"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-6), key


def test_checkpoint_of_another_config_fails_naming_the_keys(tmp_path):
    # refused from the checkpoint's stored run config, before any weight is loaded (a model that happens to
    # have the same shapes, e.g. another seed, is refused the same way)
    train(run_config(tmp_path, "c", "train.max_steps=2"))
    with pytest.raises(InputError, match=r"model\.d_model: checkpoint 32 != now 48"):
        train(run_config(tmp_path, "c", "train.max_steps=3", "model.d_model=48"))


def test_checkpoint_from_training_scores_with_the_same_auc(tmp_path):
    """recsys.train -> recsys.score on the real checkpoint format (config saved with enum values)."""
    from recsys.serving.config import ScoreConfig
    from recsys.serving.config import register_configs as register_score
    from recsys.serving.job import run_scoring

    register_score()
    report = json.loads(train(run_config(tmp_path, "t", "train.max_steps=3",
                                         "model.attention_backend=torch")).read_text())
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        dcfg = compose("score", overrides=[f"checkpoint={tmp_path / 't'}", f"output_dir={tmp_path / 's'}",
                                           "progress=false"])
    cfg: ScoreConfig = OmegaConf.to_object(dcfg)
    summary = json.loads(run_scoring(cfg).read_text())
    assert summary["complete"] and summary["requests"] > 0
    assert summary["metrics"]["auc"] == pytest.approx(report["test_auc"], abs=1e-6)
    assert summary["metrics"]["logloss"] == pytest.approx(report["test_logloss"], rel=1e-4)
