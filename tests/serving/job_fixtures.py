"""A tiny prepared dataset and a checkpoint of a randomly initialised ranker, in the training format; the
scoring settings and helpers the job tests share (the session fixtures are in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recsys.baselines.factory import build_model, max_s_tokens
from recsys.data import prepare_dataset
from recsys.data.config import DataConfig
from recsys.model.config import ModelConfig, PyramidConfig
from recsys.reliability.checkpoint import CheckpointManager
from recsys.serving.config import ScoreConfig, register_configs
from recsys.train.config import RunConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SETTINGS = ["progress=false", "num_threads=1", "rows_per_partition=8", "batch_size=4", "candidate_chunk=10"]
"""Small partitions and batches: several partitions and batches on the tiny test split."""
register_configs()


def tiny_data_config(root: Path) -> DataConfig:
    """configs/data/tiny.yaml with the dataset under ``root``."""
    base = OmegaConf.structured(DataConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.load(CONFIGS / "data" / "tiny.yaml")))
    cfg.root = str(root)
    return cfg


def make_checkpoint(out_dir: Path, data_cfg: DataConfig, seed: int = 0) -> Path:
    """``<out_dir>/checkpoints/step_0.pt`` holding a random debug-sized ranker for ``data_cfg``'s dataset."""
    ds = prepare_dataset(data_cfg, progress=False)
    model_cfg = ModelConfig(d_model=16, n_heads=2, n_layers=3, ffn_mult=2, n_ns_tokens=2, emb_dim=8, head_hidden=16,
                            pyramid=PyramidConfig(mode="linear", final=0, round_to=8), attention_backend="torch")
    torch.manual_seed(seed)
    model = build_model(ds.schema, model_cfg, max_s_tokens(ds.schema, model_cfg, data_cfg.loader.max_len))
    run = RunConfig(data=data_cfg, model=model_cfg, output_dir=str(out_dir))
    state = {"model": model.state_dict(), "step": 0,
             "config": OmegaConf.to_container(OmegaConf.structured(run), resolve=True, enum_to_str=True),
             "schema": ds.schema.to_json(),
             "max_s_tokens": max_s_tokens(ds.schema, model_cfg, data_cfg.loader.max_len)}
    return CheckpointManager(out_dir / "checkpoints").save(0, state)


def score_config(ckpt: Path, out: Path, **kw) -> ScoreConfig:
    """configs/score.yaml with :data:`SETTINGS` and ``kw`` as overrides."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        dcfg = compose("score", overrides=[f"checkpoint={ckpt}", f"output_dir={out}", *SETTINGS]
                       + [f"{k}={v}" for k, v in kw.items()])
    return OmegaConf.to_object(dcfg)


def read_output(out: Path) -> pl.DataFrame:
    """Every partition of a scoring output, in partition order."""
    return pl.read_parquet(sorted(out.glob("part-*.parquet")))
