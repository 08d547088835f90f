"""The run config the training tests share: the tiny synthetic dataset under ``root``, the debug model."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recsys.train.config import RunConfig, register_configs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
register_configs()


def run_config(root: Path, out: str, *overrides: str) -> RunConfig:
    """``configs/train.yaml`` with ``data=tiny model=debug``, data under ``root/data``, output ``root/out``."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["data=tiny", "model=debug", f"data.root={root / 'data'}",
                                          f"output_dir={root / out}", "train.progress=false",
                                          "train.tensorboard=false", *overrides])
    return OmegaConf.to_object(cfg)
