"""The model factory every entry point uses (train, score, evaluate, compare, tests).

``build_model(schema, cfg, max_s_tokens)`` builds ``cfg.arch``: the OneTrans ranker or a baseline;
``max_s_tokens(schema, cfg, max_len)`` is the longest S sequence the loader can give (what a checkpoint
stores as ``max_s_tokens``); ``sparse_parameters(model)`` returns its torchrec table weights (the
sparse optimizer's share). Every model maps a ``RequestBatch`` to logits ``[sum C_b, T]``.
"""

from __future__ import annotations

from torch import nn

from recsys.baselines.common import Baseline
from recsys.baselines.din import DINModel
from recsys.baselines.dlrm import DLRMModel
from recsys.baselines.popularity import PopularityModel
from recsys.baselines.sasrec import SASRecModel
from recsys.data.schema import DataSchema
from recsys.errors import InputError
from recsys.model.config import Arch, ModelConfig
from recsys.model.ranker import OneTransRanker


def max_s_tokens(schema: DataSchema, cfg: ModelConfig, max_len: int) -> int:
    """Longest S sequence the loader can produce: ``max_len`` per kind (+ one SEP per kind if grouped)."""
    k = len(schema.sequences)
    return k * max_len + (k if cfg.seq_merge == "intent_grouped" else 0)


def build_model(schema: DataSchema, cfg: ModelConfig, max_s_tokens: int) -> nn.Module:
    """The model named by ``cfg.arch``. ``max_s_tokens``: longest S sequence the loader can give
    (:func:`max_s_tokens` of the loader's ``max_len``)."""
    arch = Arch(cfg.arch)
    if arch == Arch.onetrans:
        return OneTransRanker(schema, cfg, max_s_tokens)
    if arch == Arch.popularity:
        return PopularityModel(schema, cfg)
    if arch == Arch.dlrm:
        return DLRMModel(schema, cfg)
    if arch == Arch.din:
        return DINModel(schema, cfg)
    if arch == Arch.sasrec:
        return SASRecModel(schema, cfg, max_s_tokens)
    if arch in (Arch.two_tower, Arch.sid_decoder):  # built by recsys.retrieval.train_hooks (above this layer)
        raise InputError(f"model.arch={arch.value} is a retriever, not a scorer: serve its <run dir>/retriever "
                         "artifact with python -m recsys.score mode=cascade cascade.retrievers=[...]")
    raise ValueError(f"unknown model.arch {arch!r}")


def sparse_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Embedding-table weights of any model :func:`build_model` makes."""
    if isinstance(model, OneTransRanker):
        return list(model.tokenizer.embeddings.parameters())
    if isinstance(model, Baseline):
        return model.sparse_parameters()
    raise TypeError(f"no sparse-parameter rule for {type(model).__name__}")
