"""What the one trainer (``recsys.train``) calls for a retriever arch; ``recsys.baselines.factory`` sits below
``recsys.retrieval`` in the layer contract, so the retriever is built here and every other arch is
delegated to the factory.

A model that brings its own loss has ``training_loss(batch) -> (loss, per_task, graph tensor)`` (the
trainer uses it instead of the task BCE), ``validation_metrics(batches, device, max_batches)`` (the
loop's validation) and ``write_artifact(run_dir, schema, dataset_dir)`` (called once, after training).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from recsys.baselines.factory import build_model
from recsys.data.schema import DataSchema
from recsys.errors import InputError
from recsys.model.config import Arch, ModelConfig
from recsys.retrieval.sid_decoder_model import SidDecoderModel
from recsys.retrieval.two_tower_model import TwoTowerModel


def build_trainable(schema: DataSchema, cfg: ModelConfig, max_s_tokens: int, sids: Any = None) -> nn.Module:
    """``cfg.arch``'s model: a retriever, or whatever :func:`build_model` builds. ``sids``: the run's
    ``SemanticIds`` (``model.item_embedding.sid_path``), the SID decoder's output vocabulary."""
    arch = Arch(cfg.arch)
    if arch == Arch.two_tower:
        return TwoTowerModel(schema, cfg, max_s_tokens)
    if arch == Arch.sid_decoder:
        if sids is None:
            raise InputError("model.arch=sid_decoder needs model.item_embedding.sid_path (the sids.pt written by "
                             "python -m recsys.quant on this data)")
        return SidDecoderModel(schema, cfg, max_s_tokens, sids.codes)
    return build_model(schema, cfg, max_s_tokens)
