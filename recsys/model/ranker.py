"""The OneTrans-style ranker: tokenizer -> stacked mixed blocks (pyramid) -> task heads.

Two ways to run the same weights, equal to float tolerance (pinned by tests):

* ``rank`` (fast, request-level): stage 1 runs each request's S tokens once through
  all layers and keeps every layer's S keys/values (`PrefixKV`); stage 2 runs each
  candidate's N NS tokens through all layers attending to that cached prefix and to
  their own earlier NS tokens (``candidate_prefix_attention``). Exact because S tokens
  never attend to NS tokens.
* ``rank_per_candidate`` (slow reference): every candidate is run alone through the
  full sequence ``[S tokens of its request ; its NS tokens]`` with plain jagged causal
  attention. Costs C full passes per request.

``forward(batch)`` is the tokenizer (whose two torchrec lookups read ``batch.id_features`` and
``batch.sparse`` as they are) followed by :func:`_rank_tokens`, opaque to torchrec's pipeline
tracer (``torch.fx.wrap``): that is the shape ``TrainPipelineSparseDist`` rewrites. Sizes come as
Python ints (``TokenizedBatch.s_lengths``), so the fast path reads none back from a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.candidate_prefix_attention import candidate_prefix_attention
from kernels.jagged_causal_attention import jagged_causal_attention
from recsys.data.batch import RequestBatch
from recsys.data.jagged import keep_last, kept_total, lengths_to_offsets, positions_in_sequence
from recsys.data.schema import DataSchema
from recsys.features.tokenizer import TokenizedBatch, UnifiedTokenizer
from recsys.model.block import OneTransBlock
from recsys.model.config import ModelConfig
from recsys.model.heads import TaskHeads
from recsys.model.pyramid import PyramidSchedule


@dataclass
class PrefixKV:
    """Per-layer S-token keys/values of a batch of requests (the user-side KV cache).

    ``keys[l], values[l]``: ``[sum_b L_b^l, H, Dh]`` for the S tokens at the input of
    layer ``l``; ``offsets[l]``: ``[B+1]``. Candidate-independent.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    offsets: list[torch.Tensor]


def ns_positions(s_offsets: torch.Tensor, cand_offsets: torch.Tensor, n_ns: int, n_cand: int | None = None
                 ) -> torch.Tensor:
    """``[C, N]`` positions of every candidate's NS tokens: its request's S length + n.

    ``s_offsets [B+1]``: the requests' full (layer-0) S sequences; ``cand_offsets [B+1]``;
    ``n_cand``: C if known (no host sync).
    """
    s_len = s_offsets[1:] - s_offsets[:-1]
    owner = torch.repeat_interleave(torch.arange(len(s_len), device=s_len.device), cand_offsets[1:] - cand_offsets[:-1],
                                    output_size=n_cand)
    return s_len[owner][:, None] + torch.arange(n_ns, device=s_len.device)


class OneTransRanker(nn.Module):
    def __init__(self, schema: DataSchema, cfg: ModelConfig, max_s_tokens: int) -> None:
        """``max_s_tokens``: longest S sequence the data can produce (sizes the pyramid)."""
        super().__init__()
        self.cfg = cfg
        self.tasks = list(schema.tasks)
        self.tokenizer = UnifiedTokenizer(schema, cfg)
        n_ns = self.tokenizer.n_ns
        self.schedule = PyramidSchedule.from_config(cfg.pyramid, cfg.n_layers, max_s_tokens)
        self.blocks = nn.ModuleList(
            OneTransBlock(cfg.d_model, cfg.n_heads, cfg.ffn_mult * cfg.d_model, n_ns, rope=cfg.rope,
                          dense_bf16=cfg.dense_bf16)
            for _ in range(cfg.n_layers))
        self.heads = TaskHeads(n_ns, cfg.d_model, cfg.head_hidden, len(self.tasks))

    @property
    def backend(self) -> str:
        return self.cfg.attention_backend

    def forward(self, batch: RequestBatch) -> torch.Tensor:
        """``batch`` -> logits ``[sum C_b, T]``."""
        return _rank_tokens(self, self.tokenizer(batch))

    # ---- fast path: shared user prefix ----------------------------------------------
    def encode_prefix(self, s_tokens: torch.Tensor, s_offsets: torch.Tensor,
                      s_lengths: tuple[int, ...] | None = None) -> PrefixKV:
        """Stage 1: S tokens ``[sum L_b, D]`` through every layer; returns each layer's K/V.

        ``s_lengths``: ``L_b`` as Python ints if known (then no size is read back from a tensor).
        """
        keys, values, offsets = [], [], []
        x, off, lens = s_tokens, s_offsets, s_lengths
        pos = positions_in_sequence(off, s_tokens.shape[0])  # [sum L_b]; kept rows keep their positions
        last = len(self.blocks) - 1
        for layer, blk in enumerate(self.blocks):
            # budget(last) == 0: the top layer's S outputs feed nothing, only its K/V are needed.
            budget = self.schedule.budget(layer)
            total = None if lens is None else kept_total(lens, budget)
            if total is not None and total == x.shape[0]:  # every row emits a query: no gathers (keep = None)
                keep, off_out = None, off
            else:
                keep, off_out = keep_last(off, budget, total)
            lens = None if lens is None else tuple(min(n, budget) for n in lens)
            q, k, v = blk.s_project(x, keep, pos)
            keys.append(k)
            values.append(v)
            offsets.append(off)
            if layer == last:
                break
            x_kept = x if keep is None else x[keep]
            if q.shape[0]:
                x = blk.s_finish(x_kept, jagged_causal_attention(q, k, v, off, off_out, backend=self.backend))
            else:  # the top layers of a pyramid may carry NS tokens only
                x = x_kept
            if keep is not None:
                off, pos = off_out, pos[keep]
        return PrefixKV(keys, values, offsets)

    def score_candidates(self, prefix: PrefixKV, ns_tokens: torch.Tensor, cand_offsets: torch.Tensor) -> torch.Tensor:
        """Stage 2: NS tokens ``[sum C_b, N, D]`` against the cached prefix -> logits ``[sum C_b, T]``."""
        x = ns_tokens
        pos = ns_positions(prefix.offsets[0], cand_offsets, x.shape[1], x.shape[0])  # [C, N]
        for layer, blk in enumerate(self.blocks):
            q, k, v = blk.ns_project(x, pos)
            attn = candidate_prefix_attention(q, k, v, prefix.keys[layer], prefix.values[layer],
                                              prefix.offsets[layer], cand_offsets, backend=self.backend)
            x = blk.ns_finish(x, attn)
        return self.heads(x)

    def rank(self, tok: TokenizedBatch) -> torch.Tensor:
        return self.score_candidates(self.encode_prefix(tok.s_tokens, tok.s_offsets, tok.s_lengths), tok.ns_tokens,
                                     tok.cand_offsets)

    # ---- reference: every candidate alone through the full sequence -------------------
    def rank_per_candidate(self, tok: TokenizedBatch, return_tokens: bool = False
                           ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slow obvious path: C independent full passes over ``[S ; NS_c]``. Logits ``[sum C_b, T]``.

        ``return_tokens=True`` returns the top layer's tokens instead, for masking tests:
        ``(s_out [sum_c kept_c, D], s_offsets [C+1], ns_out [C, N, D])``.
        """
        cand_len = tok.cand_offsets[1:] - tok.cand_offsets[:-1]
        s_len = tok.s_offsets[1:] - tok.s_offsets[:-1]
        owner = torch.repeat_interleave(torch.arange(len(s_len), device=s_len.device), cand_len)  # [C]
        s_len_c = s_len[owner]
        s_off_c = lengths_to_offsets(s_len_c)
        rows = torch.arange(int(s_off_c[-1]), device=s_len.device)
        rows = rows - torch.repeat_interleave(s_off_c[:-1] - tok.s_offsets[:-1][owner], s_len_c)
        x_s = tok.s_tokens[rows]  # [sum_c L_c, D]: a private copy of the history per candidate
        x_ns = tok.ns_tokens  # [C, N, D]
        n_cand, n_ns = x_ns.shape[0], x_ns.shape[1]
        ar_ns = torch.arange(n_ns, device=s_len.device)
        pos_s = positions_in_sequence(s_off_c)  # S positions inside each candidate's own sequence
        pos_ns = ns_positions(tok.s_offsets, tok.cand_offsets, n_ns)  # [C, N]: right after the S tokens
        for layer, blk in enumerate(self.blocks):
            s_len_c = s_off_c[1:] - s_off_c[:-1]
            keep, s_off_kept = keep_last(s_off_c, self.schedule.queries[layer])  # all S queries, top layer too
            q_s, k_s, v_s = blk.s_project(x_s, keep, pos_s)
            q_n, k_n, v_n = blk.ns_project(x_ns, pos_ns)  # [C, N, H, Dh]
            # Full sequence c = [its S tokens ; its N NS tokens]; queries = last kept S + all NS.
            full_off = lengths_to_offsets(s_len_c + n_ns)
            s_pos = torch.arange(x_s.shape[0], device=s_len.device) + torch.repeat_interleave(
                full_off[:-1] - s_off_c[:-1], s_len_c)
            ns_pos = (full_off[:-1] + s_len_c)[:, None] + ar_ns  # [C, N]
            k_full = k_s.new_empty(int(full_off[-1]), *k_s.shape[1:])
            v_full = torch.empty_like(k_full)
            k_full[s_pos], v_full[s_pos] = k_s, v_s
            k_full[ns_pos.flatten()], v_full[ns_pos.flatten()] = k_n.flatten(0, 1), v_n.flatten(0, 1)
            kept_len = s_off_kept[1:] - s_off_kept[:-1]
            q_off = lengths_to_offsets(kept_len + n_ns)
            qs_pos = torch.arange(q_s.shape[0], device=s_len.device) + torch.repeat_interleave(
                q_off[:-1] - s_off_kept[:-1], kept_len)
            qn_pos = ((q_off[:-1] + kept_len)[:, None] + ar_ns).flatten()
            q_full = q_s.new_empty(int(q_off[-1]), *q_s.shape[1:])
            q_full[qs_pos], q_full[qn_pos] = q_s, q_n.flatten(0, 1)
            attn = jagged_causal_attention(q_full, k_full, v_full, full_off, q_off, backend=self.backend)
            x_s = blk.s_finish(x_s[keep], attn[qs_pos]) if keep.numel() else x_s[keep]
            pos_s = pos_s[keep]
            x_ns = blk.ns_finish(x_ns, attn[qn_pos].view(n_cand, n_ns, *attn.shape[1:]))
            s_off_c = s_off_kept
        if return_tokens:
            return x_s, s_off_c, x_ns
        return self.heads(x_ns)


@torch.fx.wrap  # opaque to torchrec's pipeline tracer (it only needs the tokenizer's lookup inputs)
def _rank_tokens(model: OneTransRanker, tok: TokenizedBatch) -> torch.Tensor:
    """``OneTransRanker.rank``: logits ``[sum C_b, T]``."""
    return model.rank(tok)
