"""The model, optimizer settings and global batches shared by the 2-rank workers and the 1-process reference."""

from __future__ import annotations

from dataclasses import replace

import torch
from omegaconf import OmegaConf

from recsys.baselines.factory import build_model, max_s_tokens
from recsys.data.batch import RequestBatch
from recsys.data.schema import DataSchema
from recsys.dist.config import OptimConfig
from recsys.dist.meta_init import build_meta_model
from recsys.dist.schedule import lr_multiplier
from recsys.model.config import ModelConfig
from recsys.model.ranker import OneTransRanker
from recsys.testing import random_request_batch, tiny_schema

SCHEMA = tiny_schema()
# tests/dist/test_meta_init.py: an item table of a few thousand rows (odd: unequal row-wise shards; several
# seeded init blocks per shard, shard boundary inside a block)
META_SCHEMA = replace(SCHEMA, num_items=9001)
MAX_LEN = 12
WARMUP, TOTAL = 2, 6
# Per request (global batch of 6 = 3 per rank): histories with empty, length-1 and long ones;
# candidate counts differ between the two halves, so the ranks hold unequal candidate counts.
HISTORIES = [[0, 1], [1, 0], [12, 7], [3, 3], [0, 0], [9, 12]]
CANDIDATES = [1, 4, 2, 6, 1, 3]


def model_config() -> ModelConfig:
    debug = OmegaConf.load(__file__.rsplit("/tests/", 1)[0] + "/configs/model/debug.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), debug))


def build(schema: DataSchema = SCHEMA) -> OneTransRanker:
    torch.manual_seed(0)
    cfg = model_config()
    return build_model(schema, cfg, max_s_tokens(schema, cfg, MAX_LEN))


def build_meta(schema: DataSchema = META_SCHEMA) -> OneTransRanker:
    """``build(schema)`` with the tables on meta (same seed: same dense weights, same table init)."""
    torch.manual_seed(0)
    return build_meta_model(schema, model_config(), max_s_tokens(schema, model_config(), MAX_LEN))


SID_COLUMNS, SID_CODES = 2, 5


def build_sid() -> OneTransRanker:
    """``build()`` with semantic-ID items (``item_embedding.mode=both``: the id table, zero at start, plus the
    ``sid_table`` of ``SID_COLUMNS x (SID_CODES + 1)`` rows) and fixed codes, some items without a SID (-1)."""
    torch.manual_seed(0)
    cfg = model_config()
    cfg = replace(cfg, item_embedding=replace(cfg.item_embedding, mode="both", sid_columns=SID_COLUMNS,
                                              sid_codebook_size=SID_CODES))
    model = build_model(SCHEMA, cfg, max_s_tokens(SCHEMA, cfg, MAX_LEN))
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(-1, SID_CODES, (SCHEMA.num_items, SID_COLUMNS), generator=g)
    model.tokenizer.embeddings.set_item_sids(codes)
    return model


def optim_config() -> OptimConfig:
    return OptimConfig(dense_lr=3e-3, sparse_lr=0.05, clip_grad_norm=1.0, warmup_steps=WARMUP)


def lr_lambda(step: int) -> float:
    return lr_multiplier(step, WARMUP, TOTAL, "cosine", 0.1)


def global_batch(t: int, schema: DataSchema = SCHEMA) -> RequestBatch:
    rot = t % len(CANDIDATES)  # vary which request lands on which rank from step to step
    return random_request_batch(schema, HISTORIES[rot:] + HISTORIES[:rot], CANDIDATES[rot:] + CANDIDATES[:rot],
                                seed=100 + t)


def global_batch_with_prior(t: int) -> RequestBatch:
    """:func:`global_batch` with a residual ranker's per-candidate prior ``[sum C_b]`` (random, seeded by ``t``)."""
    b = global_batch(t)
    b.prior = 2 * torch.randn(b.num_candidates, generator=torch.Generator().manual_seed(500 + t))
    return b
