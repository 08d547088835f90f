"""Load any model ``recsys.train`` wrote (OneTrans ranker or baseline) from its checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from recsys.baselines.factory import build_model
from recsys.data.schema import DataSchema
from recsys.model.config import ModelConfig
from recsys.reliability.checkpoint import load_checkpoint, load_model_state


def load_any_model(path: Path, device: torch.device) -> tuple[nn.Module, DataSchema, dict[str, Any]]:
    """(model in eval mode on ``device``, its data schema, the checkpoint's plain run config)."""
    state = load_checkpoint(path)
    schema = DataSchema.from_json(state["schema"])
    config = state["config"]
    # structured merge: every key type-checked; checkpoints without ``arch`` are OneTrans rankers
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), config["model"]))
    model = build_model(schema, model_cfg, int(state["max_s_tokens"]))
    load_model_state(model, state["model"], str(path))
    return model.to(device).eval(), schema, config
