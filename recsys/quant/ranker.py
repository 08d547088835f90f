"""Glue between ``SemanticIds`` and the ranker: resolve the SID config, install the item -> SID table,
and extend it at scoring time for items that only have a content vector."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from recsys.errors import InputError
from recsys.model.config import Arch, ItemEmbeddingMode, ModelConfig
from recsys.quant.artifact import SemanticIds
from recsys.quant.content import read_content_parquet


def resolve_item_embedding(model_cfg: ModelConfig) -> tuple[ModelConfig, SemanticIds | None]:
    """(config with ``sid_columns`` / ``sid_codebook_size`` filled from ``sid_path``, the SIDs);
    ``(model_cfg, None)`` in id mode, except for ``model.arch=sid_decoder``, whose output vocabulary the
    SIDs are (then ``(model_cfg, the SIDs)``, the tables still by id). Returns a new config; the argument
    is not modified."""
    ie = model_cfg.item_embedding
    decoder = Arch(model_cfg.arch) == Arch.sid_decoder
    if ie.mode == ItemEmbeddingMode.id and not decoder:
        return model_cfg, None
    if not ie.sid_path:
        need = "model.arch=sid_decoder" if decoder else f"model.item_embedding.mode={ie.mode.value}"
        raise InputError(f"{need} needs model.item_embedding.sid_path (the sids.pt written by python -m recsys.quant)")
    sids = SemanticIds.load(ie.sid_path)
    if ie.mode == ItemEmbeddingMode.id:
        return model_cfg, sids
    m = ie.sid_columns or sids.num_columns
    if m > sids.num_columns:
        raise InputError(f"item_embedding.sid_columns={m} but {ie.sid_path} has {sids.num_columns} columns")
    k = ie.sid_codebook_size or int(sids.cardinality[:m].max())
    if k < int(sids.cardinality[:m].max()):
        raise InputError(f"item_embedding.sid_codebook_size={k} < the codebook size in {ie.sid_path} "
                         f"({int(sids.cardinality[:m].max())})")
    resolved = dataclasses.replace(ie, sid_columns=m, sid_codebook_size=k)
    return dataclasses.replace(model_cfg, item_embedding=resolved), sids


def install_sids(model: torch.nn.Module, sids: SemanticIds, num_items: int) -> None:
    """Puts ``sids.codes`` into the ranker's ``FeatureEmbeddings`` (padded with -1 up to ``num_items`` rows)."""
    codes = sids.codes
    if codes.shape[0] < num_items:
        codes = torch.cat([codes, codes.new_full((num_items - codes.shape[0], codes.shape[1]), -1)])
    model.tokenizer.embeddings.set_item_sids(codes)


def add_new_items(model: torch.nn.Module, sid_state: dict, content_path: str | Path, num_items: int) -> SemanticIds:
    """Scoring time: items of the Parquet ``content_path`` (item_id, vector) that have no SID yet get one
    from the checkpoint's quantizer (unique via the next free disambiguation code); installs and returns it."""
    ids, vecs = read_content_parquet(content_path)
    sids = SemanticIds.from_dict(sid_state).with_new_items(ids, vecs)
    install_sids(model, sids, num_items)
    return sids


def with_resolved_sids(run_cfg: Any) -> tuple[Any, SemanticIds | None]:
    """A training ``RunConfig`` -> (a copy whose ``model.item_embedding`` sizes come from its sid_path, the SIDs)."""
    model_cfg, sids = resolve_item_embedding(run_cfg.model)
    return (run_cfg if sids is None else dataclasses.replace(run_cfg, model=model_cfg)), sids
