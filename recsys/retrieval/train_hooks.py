"""What the one trainer (``recsys.train``) calls for a retriever arch; ``recsys.baselines.factory`` sits below
``recsys.retrieval`` in the layer contract, so the retriever is built here and every other arch is
delegated to the factory.

A model that brings its own loss has ``training_loss(batch) -> (loss, per_task, graph tensor)`` (the
trainer uses it instead of the task BCE), ``validation_metrics(batches, device, max_batches)`` (the
loop's validation) and ``write_artifact(run_dir, schema, dataset_dir)`` (called once, after training).
"""

from __future__ import annotations

from torch import nn

from recsys.baselines.factory import build_model
from recsys.data.schema import DataSchema
from recsys.model.config import Arch, ModelConfig
from recsys.retrieval.two_tower_model import TwoTowerModel


def build_trainable(schema: DataSchema, cfg: ModelConfig, max_s_tokens: int) -> nn.Module:
    """``cfg.arch``'s model: the two-tower retriever, or whatever :func:`build_model` builds."""
    if Arch(cfg.arch) == Arch.two_tower:
        return TwoTowerModel(schema, cfg, max_s_tokens)
    return build_model(schema, cfg, max_s_tokens)
