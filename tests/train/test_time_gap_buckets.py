"""A non-default ``model.time_gap_buckets`` reaches every loader: training (train / valid / test), the scoring
job and ``recsys.evaluate`` bucket the time gaps the way the model's table expects (the tokenizer refuses a
batch bucketed otherwise, at the first forward)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recsys.evaluate.config import EvaluateConfig
from recsys.evaluate.config import register_configs as register_evaluate_configs
from recsys.evaluate.run import run_evaluation
from recsys.reliability.checkpoint import CheckpointManager, load_checkpoint
from recsys.serving.config import ScoreConfig
from recsys.serving.config import register_configs as register_score_configs
from recsys.serving.job import run_scoring
from recsys.train.config import RunConfig, register_configs
from recsys.train.loop import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BUCKETS = 13  # configs default: 64
register_configs()
register_score_configs()
register_evaluate_configs()


def _compose(name: str, overrides: list[str]) -> RunConfig | ScoreConfig | EvaluateConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_object(compose(name, overrides=overrides))


def test_non_default_time_gap_buckets_trains_scores_and_evaluates(tmp_path):
    cfg = _compose("train", ["data=tiny", "model=debug", f"data.root={tmp_path / 'data'}",
                             f"output_dir={tmp_path / 'run'}", "train.progress=false", "train.max_steps=3",
                             f"model.time_gap_buckets={BUCKETS}"])
    report = json.loads(train(cfg).read_text())
    assert report["steps"] == 3 and math.isfinite(report["test_auc"]) and math.isfinite(report["valid_auc"])
    ckpt = CheckpointManager(tmp_path / "run" / "checkpoints").paths()[-1]
    state = load_checkpoint(ckpt)
    assert state["config"]["model"]["time_gap_buckets"] == BUCKETS
    assert next(v.shape[0] for k, v in state["model"].items() if "time_gap" in k) == BUCKETS  # the table trained

    summary = json.loads(run_scoring(_compose("score", [
        f"checkpoint={ckpt}", f"output_dir={tmp_path / 'score'}", "progress=false", "num_threads=1",
        "batch_size=8"])).read_text())
    scores = pl.read_parquet(sorted((tmp_path / "score").glob("part-*.parquet")))
    assert scores.height > 0 and summary
    metrics = json.loads(run_evaluation(_compose("evaluate", [
        f"checkpoint={ckpt}", f"output_dir={tmp_path / 'eval'}", "progress=false", "catalog.max_requests=4"])
    ).read_text())
    assert math.isfinite(metrics["auc"])
