"""Fixtures of tests/quant: the tiny synthetic dataset (configs/data/tiny.yaml) under a temp root."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recsys.data import RequestLoader, prepare_dataset
from recsys.data.config import DataConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def tiny_data_config(root: Path, **synthetic) -> DataConfig:
    base = OmegaConf.structured(DataConfig)
    cfg = OmegaConf.merge(base, OmegaConf.load(CONFIGS / "data" / "tiny.yaml"),
                          {"root": str(root), "synthetic": synthetic})
    return OmegaConf.to_object(cfg)


@pytest.fixture(scope="package")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quant_data")


@pytest.fixture(scope="package")
def tiny_batch(tiny_root):
    cfg = tiny_data_config(tiny_root)
    ds = prepare_dataset(cfg, progress=False)
    return ds.schema, next(iter(RequestLoader(ds.splits["test"], ds.schema, cfg.loader)))
