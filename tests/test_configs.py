"""Every YAML file under configs/ loads into its structured config; typos fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from recsys.train.config import RunConfig, register_configs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("data", "model", "train", "dist")
NEEDS = {("data", "eventlog"): [f"data.eventlog.events={CONFIGS.parent / 'data/fixtures/eventlog-mini/ratings.csv'}"]}
"""Options that name no input of their own: the overrides a user adds (data=eventlog: the event log)."""
register_configs()


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_every_yaml_file_is_covered():
    """Recursively: each YAML is either a primary config or an option of a known group."""
    primaries = {"train.yaml", "prepare.yaml", "score.yaml", "quant.yaml",
                 "evaluate.yaml", "compare.yaml"}  # issue 10: composed in tests/evaluate/test_configs_eval.py
    for path in CONFIGS.rglob("*.yaml"):
        rel = path.relative_to(CONFIGS)
        assert rel.name in primaries if len(rel.parts) == 1 else rel.parts[0] in GROUPS, rel


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_group_option_composes_into_run_config(group, option):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"{group}={option}", "output_dir=/tmp/x", *NEEDS.get((group, option), [])])
    run = OmegaConf.to_object(cfg)  # runs every __post_init__
    assert isinstance(run, RunConfig)


@pytest.mark.parametrize("override,error", [
    ("model.d_modle=64", (ConfigCompositionException, ConfigKeyError)),
    ("train.optim.dense=adam", (ConfigCompositionException, ValidationError)),
    ("model.seq_merge=interleaved", (ConfigCompositionException, ValidationError)),
])
def test_typos_fail_at_startup(override, error):
    with pytest.raises(error):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            compose("train", overrides=[override])


def test_post_init_validation_runs():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["model.d_model=30", "model.n_heads=4"])
    with pytest.raises(ValueError, match="divisible"):
        OmegaConf.to_object(cfg)


def test_prepare_and_score_primaries_compose():
    from recsys.data.__main__ import PrepareConfig  # registers prepare_schema
    from recsys.serving.config import ScoreConfig
    from recsys.serving.config import register_configs as register_score

    register_score()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        prep = compose("prepare")
        score = compose("score", overrides=["checkpoint=/tmp/ckpt", "output_dir=/tmp/out"])
        with pytest.raises((ConfigCompositionException, ConfigKeyError)):
            compose("score", overrides=["checkpoint=/tmp/ckpt", "output_dir=/tmp/out", "cache.max_byte=1"])
    assert isinstance(OmegaConf.to_object(score), ScoreConfig)
    assert isinstance(OmegaConf.to_object(prep), PrepareConfig)
