"""``model.arch=sid_decoder``: the generative retriever (``SidDecoder`` over its own OneTrans backbone's user
prefix) as a model the one trainer (``recsys.train.step``) trains.

Shapes: ``B`` requests, ``C`` candidate rows, ``P`` training targets (positive candidates with a SID),
``I`` item-id rows (row 0 = padding), ``L`` SID levels, ``V`` codes per level.

* **Semantic IDs**: ``codes [I, L]`` = ``SemanticIds.codes`` of ``model.item_embedding.sid_path`` (what
  ``python -m recsys.quant`` writes: the semantic columns + the disambiguation column, so every item's
  SID is unique), ``-1`` rows for items without one. ``V`` = the largest code + 1 over every column.
  The backbone may still embed items by id (``item_embedding.mode=id``): the SIDs are the decoder's
  output vocabulary either way.
* **Loss** (:meth:`SidDecoderModel.training_loss`, the trainer's own-loss hook): teacher forcing,
  ``mean_p sum_l -log p(code_l of target p | history of its request, code_<l)``. Targets are the
  request's positive candidates (task 0 label 1; every candidate with ``retrieval.sid_targets=candidates``,
  for a log of choices such as ml-100k's ratings), the item the user engaged with at the request time,
  read with the request's history only (the loader's history is strictly before the request), so no
  target is ever an input. Several positives of one request are several sequences over one shared
  prefix (``cand_offsets``); a positive without a SID is not trained on.
* **forward(batch)**: each candidate's SID log-probability ``sum_l log p(code_l | ...)`` as ``[C, T]``
  logits (one column per task), so ``predict`` / ``report.json``'s AUCs read the retriever like any
  ranker; a candidate without a SID gets ``NO_SID_SCORE``.
* **Validation** (:meth:`validation_metrics`): recall@K of the split's positives in the constrained beam
  search's top ``K = retrieval.recall_k`` (beam width ``K``) over every item that has a SID.
* **Artifact** (:meth:`write_artifact`): ``<run>/retriever``, kind ``sid`` (``save_retriever`` with the
  backbone and the code table), served by ``python -m recsys.score mode=cascade``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recsys.baselines.common import Baseline, candidate_owner, recall_in_top_k
from recsys.data.batch import RequestBatch
from recsys.data.jagged import lengths_to_offsets
from recsys.data.schema import DataSchema
from recsys.errors import InputError
from recsys.features.tokenizer import UnifiedTokenizer
from recsys.model.config import ModelConfig, TargetItems
from recsys.model.ranker import OneTransRanker
from recsys.retrieval.artifact import save_retriever
from recsys.retrieval.sid_decoder import SidDecoder, sid_logprob, user_prefix
from recsys.retrieval.sid_search import sid_beam_search
from recsys.retrieval.sid_trie import SidTrie
from recsys.retrieval.two_tower_model import ARTIFACT_DIR

NO_SID_SCORE = -1e4
"""forward's score of a candidate without a SID (below any SID's log-probability at these sizes)."""


def item_code_table(codes: torch.Tensor, num_items: int) -> torch.Tensor:
    """``SemanticIds.codes [I', L]`` -> ``[num_items, L]`` int64 (``-1`` rows added for ids beyond ``I'``);
    a table longer than the schema's catalog, or without any item that has a SID, is refused."""
    if codes.ndim != 2 or codes.shape[1] < 1:
        raise InputError(f"model.arch=sid_decoder: the SID table must be [items, levels], got {tuple(codes.shape)}")
    if codes.shape[0] > num_items:
        raise InputError(f"model.arch=sid_decoder: the SID table has {codes.shape[0]} rows but the data's catalog "
                         f"{num_items} (SIDs of another catalog? run python -m recsys.quant on this data)")
    codes = codes.long()
    pad = codes.new_full((num_items - codes.shape[0], codes.shape[1]), -1)
    table = torch.cat([codes, pad])
    if not bool((table >= 0).all(1).any()):
        raise InputError("model.arch=sid_decoder: no item of the SID table has a semantic ID")
    return table


class SidDecoderModel(Baseline):
    """A :class:`SidDecoder` on its own OneTrans backbone, with the trainer's own-loss hook."""

    def __init__(self, schema: DataSchema, cfg: ModelConfig, max_s_tokens: int, codes: torch.Tensor) -> None:
        super().__init__()
        self.tasks, self.max_s_tokens, self.recall_k = list(schema.tasks), max_s_tokens, cfg.retrieval.recall_k
        self.sid_targets, self.valid_targets = cfg.retrieval.sid_targets, cfg.retrieval.valid_targets
        table = item_code_table(codes, schema.num_items)
        self.register_buffer("codes", table)  # [I, L]
        self.ranker = OneTransRanker(schema, cfg, max_s_tokens)
        self.decoder = SidDecoder(cfg, table.shape[1], int(table.max()) + 1)

    @property
    def tokenizer(self) -> UnifiedTokenizer:
        """The backbone's tokenizer (``install_sids`` fills its SID tables in ``item_embedding.mode=sid/both``)."""
        return self.ranker.tokenizer

    def sparse_parameters(self) -> list[nn.Parameter]:
        return list(self.ranker.tokenizer.embeddings.parameters())

    def catalog_trie(self) -> SidTrie:
        """Trie of every item (ids ``>= 1``) that has a SID."""
        items = torch.arange(1, self.codes.shape[0], device=self.codes.device)
        items = items[(self.codes[items] >= 0).all(1)]
        return SidTrie(self.codes[items].cpu(), items.cpu(), vocab_size=self.decoder.vocab_size)

    def targets(self, batch: RequestBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(target SIDs ``[P, L]``, their requests' offsets ``[B+1]``): the positive candidates (or every
        candidate, ``retrieval.sid_targets=candidates``) with a SID."""
        items = batch.cand["item_id"].values().long()
        codes = self.codes[items]  # [C, L]
        keep = (codes >= 0).all(1)
        if self.sid_targets == TargetItems.positives:
            keep &= batch.labels[:, 0] > 0.5
        counts = torch.bincount(candidate_owner(batch)[keep], minlength=batch.num_requests)
        return codes[keep], lengths_to_offsets(counts)

    def training_loss(self, batch: RequestBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The trainer's own-loss hook: (mean SID NLL over the batch's ``P`` targets, per-task ``[0]``, the
        decoder's per-target log-probabilities ``[P]`` (the graph tensor the trainer's fault hook may use))."""
        codes, offsets = self.targets(batch)
        if codes.shape[0] == 0:  # no positive with a SID: a zero loss on the graph (not a NaN mean)
            zero = self.decoder.start.sum() * 0.0
            return zero, zero.new_zeros(0), zero.reshape(1)
        logp = sid_logprob(self.decoder, user_prefix(self.ranker, batch), codes, offsets)  # [P]
        return -logp.mean(), logp.new_zeros(0), logp

    def forward(self, batch: RequestBatch) -> torch.Tensor:
        """``[C, T]``: each candidate's SID log-probability in every task column."""
        codes = self.codes[batch.cand["item_id"].values().long()]  # [C, L]
        has = (codes >= 0).all(1)
        logp = sid_logprob(self.decoder, user_prefix(self.ranker, batch), codes.clamp(min=0),
                           batch.cand_offsets.long())
        score = torch.where(has, logp, logp.new_full((), NO_SID_SCORE))
        return score.unsqueeze(1).expand(-1, len(self.tasks))

    @torch.no_grad()
    def validation_metrics(self, batches: Iterable[RequestBatch], device: torch.device, max_batches: int = 0,
                           prefix: str = "valid_") -> dict[str, Any]:
        """``{prefix}recall@K``: share of positive candidates (task 0; every candidate with
        ``retrieval.valid_targets=candidates``) in their request's beam-search top K."""
        trie = self.catalog_trie()
        k = min(self.recall_k, len(trie))
        certified: list[torch.Tensor] = []  # [B] per batch

        def top(batch: RequestBatch) -> torch.Tensor:
            res = sid_beam_search(self.decoder, user_prefix(self.ranker, batch), trie, k)
            certified.append(res.certified)
            return res.item_ids

        found, total = recall_in_top_k(self, batches, device, max_batches, top, self.valid_targets)
        requests = sum(c.numel() for c in certified)
        certified_n = sum(int(c.sum()) for c in certified)
        return {f"{prefix}recall@{self.recall_k}": found / total if total else math.nan,
                f"{prefix}recall_targets": total, f"{prefix}recall_catalog": len(trie),
                f"{prefix}beam_certified": certified_n / requests if requests else math.nan}

    def write_artifact(self, run_dir: Path, schema: DataSchema, dataset_dir: str | Path | None) -> Path:
        """``<run_dir>/retriever``: the decoder, its backbone and the code table as a ``save_retriever``
        artifact of kind ``sid`` (replaced on a rerun)."""
        return save_retriever(run_dir / ARTIFACT_DIR, self.decoder, schema, max_s_tokens=self.max_s_tokens,
                              dataset_dir=dataset_dir, backbone=self.ranker, codes=self.codes,
                              overwrite=(run_dir / ARTIFACT_DIR).exists())
