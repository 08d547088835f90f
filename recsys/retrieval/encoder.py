"""Two-tower encoder on the ranker's own pieces: user vectors from the S tokens, item vectors from the
item tables, for the faiss index (``recsys.retrieval.index``) and the sampled-softmax loss.

Shapes: ``B`` requests, ``L_b`` S tokens of request b, ``D`` model width, ``E`` embedding width,
``O`` retrieval vector width, ``N`` items.

* User tower: the request's S tokens (the ranker's tokenizer) through the ranker's block stack, S side
  only (S tokens never attend to NS tokens, so nothing depends on the candidates). The user vector is
  the output of the newest S token after the top block, projected to ``O``. The pyramid schedule is
  the ranker's, except that every layer keeps at least that newest token as a query (the ranker's top
  layer computes no S output at all). A request with no history gets a learned vector.
* Item tower: ``[item_id embedding | category embedding]`` from the ranker's tables (through
  ``FeatureEmbeddings.sequence``, so id, SID and hashed item modes all apply), projected to ``O``.

The model's internals are read in two functions only (``s_tokens_of`` and ``item_embeddings``): the
tokenizer's input interface is changing (KJTs built in collate), and only these two need to follow.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from kernels.jagged_causal_attention import jagged_causal_attention
from recsys.data.batch import RequestBatch
from recsys.data.jagged import keep_last, positions_in_sequence
from recsys.embeddings.tables import FeatureEmbeddings
from recsys.model.ranker import OneTransRanker


def s_tokens_of(ranker: OneTransRanker, batch: RequestBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` -> (S tokens ``[sum L_b, D]``, offsets ``[B+1]``) from the ranker's tokenizer."""
    tok = ranker.tokenizer(batch)
    return tok.s_tokens, tok.s_offsets


def item_embeddings(emb: FeatureEmbeddings, item_ids: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
    """``item_ids [N]``, ``categories [N]`` -> ``[N, 2E]``: the rows the ranker embeds a candidate with.
    Every feature of the collection gets a key (torchrec looks features up by name); only the
    candidate ones hold values."""
    n = item_ids.numel()
    names = [f for cfg in emb.seq_tables.embedding_configs() for f in cfg.feature_names]
    names += [k for k in ("cand.item_id", "cand.category") if k not in names]  # sid mode: no id table
    given = {"cand.item_id": item_ids.long(), "cand.category": categories.long()}
    empty = item_ids.new_zeros(0, dtype=torch.int64)
    values = [given.get(k, empty) for k in names]
    lengths = [torch.full((n,), 1 if k in given else 0, dtype=torch.int32) for k in names]
    out = emb.sequence(KeyedJaggedTensor(keys=names, values=torch.cat(values), lengths=torch.cat(lengths)))
    return torch.cat([out["cand.item_id"].values(), out["cand.category"].values()], -1)


def newest_s_state(ranker: OneTransRanker, s_tokens: torch.Tensor, s_offsets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-block output of each request's newest S token: (``[B', D]``, ``has_history [B]`` bool),
    rows for the ``B'`` requests with ``L_b > 0`` in request order."""
    x, off = s_tokens, s_offsets
    pos = positions_in_sequence(off)  # [sum L_b]; kept rows keep their positions
    for layer, blk in enumerate(ranker.blocks):
        # At least the newest token is a query at every layer: its top output is the user state.
        keep, off_out = keep_last(off, max(ranker.schedule.queries[layer], 1))
        q, k, v = blk.s_project(x, keep, pos)
        attn = jagged_causal_attention(q, k, v, off, off_out, backend=ranker.backend)
        x, off, pos = blk.s_finish(x[keep], attn), off_out, pos[keep]
    newest = off[1:][off[1:] > off[:-1]] - 1  # last kept row of every non-empty request
    return x[newest], off[1:] > off[:-1]


class TwoTowerEncoder(nn.Module):
    """User and item vectors ``[*, O]`` on a (shared, not copied) ranker."""

    def __init__(self, ranker: OneTransRanker, out_dim: int) -> None:
        super().__init__()
        self.ranker = ranker
        d, e = ranker.cfg.d_model, ranker.cfg.emb_dim
        self.user_proj = nn.Linear(d, out_dim)
        self.item_proj = nn.Linear(2 * e, out_dim)
        self.empty_history = nn.Parameter(torch.zeros(d))

    def user_vectors(self, batch: RequestBatch) -> torch.Tensor:
        """``[B, O]``, one per request, from its history alone."""
        s_tokens, s_offsets = s_tokens_of(self.ranker, batch)
        state, has = newest_s_state(self.ranker, s_tokens, s_offsets)
        full = self.empty_history.expand(has.numel(), -1).clone()  # [B, D]
        full[has] = state
        return self.user_proj(full)

    def item_vectors(self, item_ids: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
        """``item_ids [N]``, ``categories [N]`` -> ``[N, O]``."""
        return self.item_proj(item_embeddings(self.ranker.tokenizer.embeddings, item_ids, categories))
