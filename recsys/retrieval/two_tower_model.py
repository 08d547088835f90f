"""``model.arch=two_tower``: the two-tower retriever as a model the one trainer (``recsys.train.step``) trains.

Shapes: ``B`` requests, ``L_b`` merged history events of request b (= its S tokens), ``P`` training
positions (``sum_b max(L_b - 1, 0)``), ``O`` vector width, ``I`` catalog rows (row 0 = padding).

* **Loss** (:meth:`TwoTowerModel.training_loss`, the trainer's own-loss hook): next item at every
  history position (each request's newest ``model.retrieval.max_positions`` only, when set). The user
  vector after event ``t`` of a request (the top output of S token ``t`` with every S token a query:
  causal attention, so it reads events ``0..t`` only) predicts event
  ``t+1``'s item. Targets are history events only, all strictly before the request time (the loader's
  history is), so nothing at or after the time of any request row is a target. Loss =
  ``recsys.retrieval.losses.retrieval_loss``: full softmax for a small catalog, else sampled softmax
  over the in-batch targets + uniform negatives with logQ; ``log q`` of an in-batch target is
  ``log(P * p_j)``, ``p_j`` its streaming frequency among the targets trained so far (counts kept in a
  buffer, so a resumed run keeps them; add-one smoothing).
* **Serving graph = training graph**: the artifact's user vector is the newest S token's output with
  the ranker's pyramid (``encoder.newest_s_state``); with ``pyramid.mode=none`` every layer keeps every
  token, so it is exactly the last position's training state. A pyramid is refused, as is
  ``seq_merge=intent_grouped`` (its SEP tokens are no events to predict).
* **forward(batch)** = each candidate's retrieval score ``u_b . v_c`` as ``[sum C_b, T]`` logits (one
  column per task), so ``predict`` / ``report.json``'s AUCs read the retriever like any ranker.
* **Validation** (:meth:`validation_metrics`): recall@K of the split's positive candidates (task 0
  label 1) in an exact faiss index of every catalog item (history allowed, no exclusion). Item
  categories come from the (item, category) pairs seen in training batches (buffer; unseen items: 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kernels.jagged_causal_attention import jagged_causal_attention
from recsys.baselines.common import Baseline, candidate_owner, merged_history, recall_in_top_k
from recsys.data.batch import RequestBatch
from recsys.data.jagged import keep_last, positions_in_sequence
from recsys.data.schema import DataSchema
from recsys.errors import InputError
from recsys.features.config import SeqMerge
from recsys.features.tokenizer import UnifiedTokenizer
from recsys.model.config import ModelConfig, PyramidMode
from recsys.model.ranker import OneTransRanker
from recsys.retrieval.artifact import save_retriever
from recsys.retrieval.encoder import TwoTowerEncoder, s_tokens_of
from recsys.retrieval.index import ItemIndex
from recsys.retrieval.losses import RetrievalLossConfig, retrieval_loss

ARTIFACT_DIR = "retriever"
"""Where training writes the retriever artifact, under the run directory."""


def all_s_states(ranker: OneTransRanker, s_tokens: torch.Tensor, s_offsets: torch.Tensor) -> torch.Tensor:
    """Top-block output of every S token, every token a query at every layer: ``[sum L_b, D]`` (causal)."""
    x, off = s_tokens, s_offsets
    pos = positions_in_sequence(off)
    widest = int((off[1:] - off[:-1]).max()) if off.numel() > 1 else 0
    for blk in ranker.blocks:
        keep, off_out = keep_last(off, max(widest, 1))  # every row
        q, k, v = blk.s_project(x, keep, pos)
        attn = jagged_causal_attention(q, k, v, off, off_out, backend=ranker.backend)
        x, off, pos = blk.s_finish(x[keep], attn), off_out, pos[keep]
    return x


def next_item_pairs(offsets: torch.Tensor, newest: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``offsets [B+1]`` of the merged history -> (state rows ``[P]``, target rows ``[P]``): row ``i`` of a
    request predicts row ``i + 1`` of the same request (the newest row of a request predicts nothing);
    ``newest > 0``: only each request's newest ``newest`` pairs (targets the newest ``newest`` rows)."""
    n = int(offsets[-1])
    rows = torch.arange(n, device=offsets.device)
    to_end = torch.repeat_interleave(offsets[1:] - 1, offsets[1:] - offsets[:-1], output_size=n) - rows  # 0: newest
    keep = (to_end >= 1) & (to_end <= newest) if newest > 0 else to_end >= 1
    src = rows[keep]
    return src, src + 1


class TwoTowerModel(Baseline):
    """A :class:`TwoTowerEncoder` on its own OneTrans backbone, with the trainer's own-loss hook."""

    def __init__(self, schema: DataSchema, cfg: ModelConfig, max_s_tokens: int) -> None:
        super().__init__()
        if cfg.pyramid.mode != PyramidMode.none:
            raise InputError(f"model.arch=two_tower needs model.pyramid.mode=none (got {cfg.pyramid.mode.value}): "
                             "every history position is trained, and serving reads the newest one through the "
                             "same blocks only when every layer keeps every S token")
        if cfg.seq_merge != SeqMerge.time_interleaved:
            raise InputError("model.arch=two_tower needs model.seq_merge=time_interleaved (intent_grouped adds SEP "
                             "tokens, which are no events to predict)")
        rc = cfg.retrieval
        self.tasks, self.kinds, self.max_s_tokens = list(schema.tasks), list(schema.sequences), max_s_tokens
        self.loss_cfg = RetrievalLossConfig(rc.temperature, rc.num_negatives, rc.full_softmax_max_items)
        self.recall_k, self.max_positions, self.valid_targets = rc.recall_k, rc.max_positions, rc.valid_targets
        self.encoder = TwoTowerEncoder(OneTransRanker(schema, cfg, max_s_tokens), rc.out_dim)
        self.register_buffer("target_counts", torch.zeros(schema.num_items, dtype=torch.float64))
        self.register_buffer("item_category", torch.zeros(schema.num_items, dtype=torch.int64))

    @property
    def tokenizer(self) -> UnifiedTokenizer:
        """The backbone's tokenizer (``install_sids`` fills its SID tables in ``item_embedding.mode=sid/both``)."""
        return self.encoder.ranker.tokenizer

    def sparse_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.ranker.tokenizer.embeddings.parameters())

    def position_vectors(self, batch: RequestBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(user vectors ``[P, O]`` after each non-newest history event, next-event item ids ``[P]``)."""
        hist = merged_history(batch, self.kinds, 0)
        s_tokens, s_offsets = s_tokens_of(self.encoder.ranker, batch)
        if not torch.equal(s_offsets.to(hist.offsets.dtype), hist.offsets):
            raise InputError("two_tower: the tokenizer's S tokens are not the merged history (a long-sequence or "
                             "history-cap setting?); train it on the plain history")
        src, tgt = next_item_pairs(hist.offsets, self.max_positions)
        states = all_s_states(self.encoder.ranker, s_tokens, s_offsets)
        return self.encoder.user_proj(states[src]), hist.item[tgt]

    def _observe(self, batch: RequestBatch, targets: torch.Tensor) -> None:
        """Training forward only: streaming target counts (logQ) and item -> category pairs (validation)."""
        hist = merged_history(batch, self.kinds, 0)
        cand = batch.cand.to_dict()
        items = torch.cat([hist.item, cand["item_id"].values().long()])
        self.item_category[items] = torch.cat([hist.category, cand["category"].values().long()])
        self.target_counts.index_add_(0, targets, torch.ones_like(targets, dtype=torch.float64))

    def training_loss(self, batch: RequestBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The trainer's own-loss hook: (mean loss over the batch's ``P`` positions, per-task ``[0]``, the
        user vectors ``[P, O]`` (the graph tensor the trainer's fault hook may attach to))."""
        user, targets = self.position_vectors(batch)
        with torch.no_grad():
            self._observe(batch, targets)
            p = (self.target_counts[targets] + 1) / (self.target_counts.sum() + self.target_counts.numel())
            log_q = torch.log(targets.numel() * p).float()
        if targets.numel() == 0:  # no request with two events: a zero loss on the graph (not a NaN mean)
            return user.sum() * 0.0, user.new_zeros(0), user
        item_vecs = self.encoder.item_vectors(torch.arange(self.item_category.numel(), device=user.device),
                                              self.item_category)
        return retrieval_loss(user, targets, log_q, item_vecs, self.loss_cfg), user.new_zeros(0), user

    def forward(self, batch: RequestBatch) -> torch.Tensor:
        """``[sum C_b, T]``: each candidate's retrieval score ``u_b . v_c`` in every task column."""
        cand = batch.cand.to_dict()
        user = self.encoder.user_vectors(batch)  # [B, O]
        items = self.encoder.item_vectors(cand["item_id"].values(), cand["category"].values())
        score = (user[candidate_owner(batch)] * items).sum(-1) / self.loss_cfg.temperature
        return score.unsqueeze(1).expand(-1, len(self.tasks))

    @torch.no_grad()
    def validation_metrics(self, batches: Iterable[RequestBatch], device: torch.device, max_batches: int = 0,
                           prefix: str = "valid_") -> dict[str, Any]:
        """``{prefix}recall@K``: share of positive candidates (task 0; every candidate with
        ``retrieval.valid_targets=candidates``) in their request's exact top K."""
        was = self.training
        self.eval()  # the item vectors below are built in eval mode too
        items = torch.arange(1, self.item_category.numel(), device=device)
        index = ItemIndex(self.encoder.item_vectors(items, self.item_category[items]).float().cpu(), items.cpu())
        self.train(was)
        k = min(self.recall_k, index_size := items.numel())
        found, total = recall_in_top_k(self, batches, device, max_batches,
                                       lambda b: index.search(self.encoder.user_vectors(b).float().cpu(), k)[1],
                                       self.valid_targets)
        return {f"{prefix}recall@{self.recall_k}": found / total if total else math.nan,
                f"{prefix}recall_targets": total, f"{prefix}recall_catalog": index_size}

    def write_artifact(self, run_dir: Path, schema: DataSchema, dataset_dir: str | Path | None) -> Path:
        """``<run_dir>/retriever``: the encoder as a ``save_retriever`` artifact (replaced on a rerun)."""
        return save_retriever(run_dir / ARTIFACT_DIR, self.encoder, schema, max_s_tokens=self.max_s_tokens,
                              dataset_dir=dataset_dir, overwrite=(run_dir / ARTIFACT_DIR).exists())
