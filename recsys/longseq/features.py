"""Long-history NS tokens: VQ memory read and search + target attention, one token each.

Shape legend: ``B`` requests, ``E`` long-history events (jagged, ``RequestBatch.long_seq``),
``C`` candidates, ``Ec`` embedding width, ``D`` model width, ``Dk`` key width.

Every event ``j`` of the long history is ``x_j = [item_emb | category_emb | action_emb]``
(the tokenizer's shared torchrec tables, so an event looks like the same item as an S token).

* memory (``cfg.memory``): the events *older than the S-token window* (``in_window == 0``)
  are summarised in a :class:`VQMemory` state per request; each candidate reads it with a
  query from its own embedding (O(M)); token = MLP([read | candidate | lse]).
* search (``cfg.search``): over the *full* long history (window included), hard search (same
  category, most recent first) and/or soft search (top-K in a decoupled space); then target
  attention over the K selected with logits from the decoupled search space (DARE) and values
  from ``x_j``; token = MLP([pooled | candidate | n_selected / K]).

All tokens are per candidate, so they join the candidate's NS tokens: the S-token KV cache is
untouched. The memory state depends on the user's events only and can be passed in
precomputed (serving: :meth:`LongSequenceFeatures.memory_state` once, then ``VQMemory.append``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.jagged import lengths_to_offsets
from recsys.longseq.config import LongSeqConfig, SearchMode
from recsys.longseq.memory import MemoryState, VQMemory
from recsys.longseq.search import hard_search, soft_search, target_attention


def _token_mlp(in_dim: int, d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))


class LongSequenceFeatures(nn.Module):
    def __init__(self, cfg: LongSeqConfig, emb_dim: int, d_model: int, num_items: int, num_categories: int) -> None:
        super().__init__()
        self.cfg = cfg
        in_dim, cand_dim, dk = 3 * emb_dim, 2 * emb_dim, cfg.key_dim
        self.memory = None
        if cfg.memory:
            # Keys read [item | category] of an event, the query the candidate's [item | category], through
            # the *same* projection (DIN-style: candidate and behaviour compared in one space, so a query
            # starts out pointing at the codes of similar events); a learned temperature scales the query.
            self.memory = VQMemory(in_dim, dk, d_model, cfg.codebook_size, key_in_dim=cand_dim)
            self.mem_log_temp = nn.Parameter(torch.tensor(float(4 * dk ** 0.5)).log())  # logits = 4 cos at init
            self.mem_token = _token_mlp(d_model + cand_dim + 1, d_model)
        self.modes = {SearchMode.none: [], SearchMode.hard: ["hard"], SearchMode.soft: ["soft"],
                      SearchMode.both: ["hard", "soft"]}[cfg.search]
        if self.modes:
            # Decoupled search/attention space (small plain tables: they index raw ids only and are
            # read per selected event, so a torchrec collection would add nothing here).
            self.search_item = nn.Embedding(num_items, dk)
            self.search_category = nn.Embedding(num_categories, dk)
            nn.init.normal_(self.search_item.weight, std=0.1)
            nn.init.normal_(self.search_category.weight, std=0.1)
            self.search_query = nn.Linear(dk, dk)
            self.search_value = nn.Linear(in_dim, d_model)
            self.search_token = nn.ModuleDict({m: _token_mlp(d_model + cand_dim + 1, d_model) for m in self.modes})

    @property
    def n_tokens(self) -> int:
        return int(self.memory is not None) + len(self.modes)

    # ---------------------------------------------------------------- memory (candidate-independent)
    def memory_state(self, long_seq: KeyedJaggedTensor, feats: torch.Tensor) -> MemoryState:
        """``[B]`` states of the events outside the S-token window (``feats [E, 3Ec]``)."""
        if self.memory is None:
            raise ValueError("model.long_seq.memory is off: no memory state")
        d = long_seq.to_dict()
        lengths = d["in_window"].lengths().to(torch.int64)
        owner = torch.repeat_interleave(torch.arange(lengths.numel(), device=feats.device), lengths)
        old = d["in_window"].values() == 0
        return self.memory.build(feats[old], owner[old], lengths.numel())

    # ---------------------------------------------------------------- tokens
    def forward(self, long_seq: KeyedJaggedTensor, feats: torch.Tensor | None, cand_vec: torch.Tensor,
                cand_item: torch.Tensor, cand_category: torch.Tensor, cand_offsets: torch.Tensor,
                memory: MemoryState | None = None, counts: tuple[Sequence[int], Sequence[int]] | None = None
                ) -> torch.Tensor:
        """Extra NS tokens ``[C, n_tokens, D]`` (memory first, then hard, then soft).

        ``feats [E, 3Ec]``: embeddings of the long history's events (may be None when ``memory`` is
        given and no search is configured); ``cand_vec [C, 2Ec]``;
        ``cand_item, cand_category [C]`` ids; ``memory``: precomputed ``[B]`` states, or None to
        build them from ``long_seq``; ``counts``: (events, candidates) of every request as Python
        ints (``RequestBatch.sizes``), so soft search reads no size back (None: read from the tensors).
        """
        d = long_seq.to_dict()
        lengths = d["item_id"].lengths().to(torch.int64)
        n_req = lengths.numel()
        if cand_offsets.numel() != n_req + 1:
            raise ValueError(f"long_seq has {n_req} requests but cand_offsets describes {cand_offsets.numel() - 1}")
        cand_owner = torch.repeat_interleave(torch.arange(n_req, device=cand_vec.device),
                                             cand_offsets[1:] - cand_offsets[:-1], output_size=cand_vec.shape[0])
        tokens = []
        if self.memory is not None:
            tokens.append(self._memory_token(long_seq, feats, cand_vec, cand_owner, memory))
        if self.modes:
            if feats is None:
                raise ValueError("search needs the long history's event features")
            tokens += self._search_tokens(d, feats, cand_vec, cand_item, cand_category, cand_offsets, cand_owner,
                                          counts)
        return torch.stack(tokens, 1)

    def _memory_token(self, long_seq: KeyedJaggedTensor, feats: torch.Tensor | None, cand_vec: torch.Tensor,
                      cand_owner: torch.Tensor, memory: MemoryState | None) -> torch.Tensor:
        """``[C, D]``: each candidate's read of its user's VQ memory."""
        if memory is None and feats is None:
            raise ValueError("no memory state and no event features to build it from")
        state = self.memory_state(long_seq, feats) if memory is None else memory
        n_req = long_seq.stride()
        if state.sums.shape[0] != n_req:
            raise ValueError(f"memory state has {state.sums.shape[0]} users, batch has {n_req} requests")
        query = self.memory.keys(cand_vec) * self.mem_log_temp.exp()  # [C, Dk]
        out, lse = self.memory.read(query, state, cand_owner)  # [C, D], [C]
        return self.mem_token(torch.cat([out, cand_vec, lse[:, None]], -1))

    def _search_tokens(self, d: dict, feats: torch.Tensor, cand_vec: torch.Tensor, cand_item: torch.Tensor,
                       cand_category: torch.Tensor, cand_offsets: torch.Tensor, cand_owner: torch.Tensor,
                       counts: tuple[Sequence[int], Sequence[int]] | None) -> list[torch.Tensor]:
        """One ``[C, D]`` token per search mode: target attention over the selected events."""
        ev_off = lengths_to_offsets(d["item_id"].lengths())
        ev_item, ev_cat = d["item_id"].values(), d["category"].values()
        ev_keys = self.search_item(ev_item) + self.search_category(ev_cat)  # [E, Dk]
        cand_keys = self.search_query(self.search_item(cand_item) + self.search_category(cand_category))  # [C, Dk]
        k = self.cfg.search_k
        out = []
        for mode in self.modes:
            if mode == "hard":
                idx, sel_off = hard_search(ev_cat, d["ts"].values(), ev_off, cand_category, cand_owner, k,
                                           n_cat=self.search_category.num_embeddings)
            else:
                idx, sel_off = soft_search(cand_keys.detach(), ev_keys.detach(), ev_off, cand_offsets, k, counts)
            n_sel = sel_off[1:] - sel_off[:-1]  # [C]
            sel_cand = torch.repeat_interleave(torch.arange(n_sel.numel(), device=idx.device), n_sel,
                                               output_size=idx.shape[0])
            logits = (cand_keys[sel_cand] * ev_keys[idx]).sum(-1) * self.cfg.key_dim ** -0.5  # [sum n_c]
            pooled = target_attention(logits, self.search_value(feats[idx]), sel_off)  # [C, D]
            frac = (n_sel.to(cand_vec.dtype) / k)[:, None]
            out.append(self.search_token[mode](torch.cat([pooled, cand_vec, frac], -1)))
        return out
