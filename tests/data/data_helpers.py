"""Helpers shared by the data tests (imported by name: the tests folder has no packages)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from recsys.data.config import DataConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
ML100K_FIXTURE = REPO / "data" / "fixtures" / "ml-100k-mini"
ML100K_REAL = REPO / "data" / "raw" / "ml-100k"
EVENTLOG_FIXTURE = REPO / "data" / "fixtures" / "eventlog-mini"


def load_data_config(name: str, **overrides: object) -> DataConfig:
    """configs/data/<name>.yaml merged into DataConfig, plus dotted overrides."""
    base = OmegaConf.structured(DataConfig)
    cfg = OmegaConf.merge(base, OmegaConf.load(CONFIGS / "data" / f"{name}.yaml"))
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return OmegaConf.to_object(cfg)
