"""The data YAML files load into DataConfig; bad values fail at start-up."""

from __future__ import annotations

import pytest
from data_helpers import CONFIGS, EVENTLOG_FIXTURE, load_data_config
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from recsys.data.config import DataConfig, DataSource, LoaderConfig, SyntheticConfig


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml")))
def test_every_data_yaml_loads(name):
    # eventlog names no log of its own: the committed fixture stands in for the user's file
    overrides = {"eventlog.events": str(EVENTLOG_FIXTURE / "ratings.csv")} if name == "eventlog" else {}
    cfg = load_data_config(name, **overrides)
    assert isinstance(cfg, DataConfig)
    text = (CONFIGS / "data" / f"{name}.yaml").read_text()
    assert text.startswith("#") and "python -m" in text.split("\n\n")[0]  # header names its command


def test_prepare_yaml_composes():
    import recsys.data.__main__  # noqa: F401  (registers prepare_schema)

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("prepare", overrides=["data=tiny", "data.loader.batch_size=4"])
    assert OmegaConf.to_object(cfg.data).loader.batch_size == 4


def test_typo_and_bad_choice_fail():
    base = OmegaConf.structured(DataConfig)
    with pytest.raises(Exception, match="row_groop_size"):
        OmegaConf.merge(base, {"row_groop_size": 3})
    with pytest.raises(ValidationError):
        OmegaConf.merge(base, {"source": "movielens"})


@pytest.mark.parametrize("bad", [
    lambda: SyntheticConfig(kind_rates=[0.5, 0.5]),
    lambda: SyntheticConfig(tasks=["like"]),
    lambda: SyntheticConfig(valid_fraction=0.6, test_fraction=0.5),
    lambda: LoaderConfig(batch_size=0),
    lambda: DataConfig(source="parquet"),
])
def test_post_init_rejects(bad):
    with pytest.raises(ValueError):
        bad()


def test_strings_coerce_to_enums():
    assert DataConfig(source="ml100k").source is DataSource.ml100k
