"""Fixtures of the data tests: the tiny synthetic config and a prepared copy of it."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import load_data_config

from recsys.data.config import DataConfig
from recsys.data.prepare import PreparedDataset, prepare_dataset


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> DataConfig:
    return load_data_config("tiny", root=str(tmp_path / "data"))


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    root = tmp_path_factory.mktemp("tiny")
    return prepare_dataset(load_data_config("tiny", root=str(root)), progress=False)
