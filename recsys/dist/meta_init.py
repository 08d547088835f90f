"""The model with its torchrec tables on the ``meta`` device: what each rank builds before DMP shards it.

A full CPU model per rank holds every table whole (and ``shard_model`` clones it once more), so a
rank needs ``2 x`` the whole tables' memory before it keeps its shard. Built here instead, the
tables are shapes only; ``recsys.dist.sharding.shard_meta_model`` then lets DMP allocate and
initialise only this rank's shards, each by its table's ``SeededTableInit``
(``recsys/embeddings/seeded_init.py``): the values the plain model's full table has at those rows.
Dense modules (tokenizer projections, blocks, heads) are built on CPU as usual; they draw the same
global-RNG values as in the plain model (the table constructors run with the RNG forked), so the
same ``torch.manual_seed`` gives the same initial model, whichever device the tables started on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from recsys.baselines.factory import build_model
from recsys.data.schema import DataSchema
from recsys.embeddings.seeded_init import tables_on
from recsys.model.config import ModelConfig

META = torch.device("meta")


def build_meta_model(schema: DataSchema, model_cfg: ModelConfig, max_s_tokens: int) -> nn.Module:
    """``recsys.baselines.build_model(schema, model_cfg, max_s_tokens)`` with every ``FeatureEmbeddings``
    table on meta (no memory, not initialised); everything else on CPU, initialised as in the plain model."""
    return on_meta(lambda: build_model(schema, model_cfg, max_s_tokens))


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` (any model builder: the trainer's also installs SID codes) with its tables on meta."""
    with tables_on(META):
        return build()


def meta_tensors(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` still on meta."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, t in named if getattr(t, "is_meta", False)]
