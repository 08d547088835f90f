"""Generative retriever: a decoder over the ranker's cached user prefix that emits the next item's
semantic ID (SID) one code at a time.

Shapes: ``R`` requests, ``C`` decoded sequences (beams, or one target per request in training),
``L`` SID levels, ``V`` codes per level, ``D`` model width, ``H`` heads, ``Dh = D / H``,
``n`` code tokens of a sequence (``n <= L``).

User prefix. The request's S tokens come from the ranker's tokenizer (``encoder.s_tokens_of``, the one
entry point) and go through the ranker's S stack once (``OneTransRanker.encode_prefix``): the result,
``PrefixKV`` (per-layer S keys/values), is exactly the candidate-independent state the ranker's serving
path caches per user (``recsys.serving.state``), so one cached prefix serves both the ranker and this
decoder. The decoder has the ranker's ``n_layers``, ``n_heads`` and ``d_model``; its layer ``l`` attends
to the ranker's layer-``l`` prefix K/V (pyramid included).

Code tokens. Token 0 is a learned start vector, token ``i >= 1`` is ``code_emb[i - 1, code_{i-1}]``
(one ``[V, D]`` table per level; the last level's code is never an input, hence ``[L - 1, V, D]``).
Token ``i`` sits at position ``S length + i`` (``ns_positions``, as the ranker's NS tokens) and its top
output, through a per-level head ``[L, D, V]``, gives ``log p(code_i | history, code_<i)`` (log-softmax
over all ``V`` codes; beam search adds the trie constraint). The code tokens of one sequence attend to
the request's whole prefix and causally to each other, never to other sequences: the sequences of a
request are the op's candidates (``candidate_prefix_attention``, ``cand_offsets``), so beams share the
prefix without copying it.

Empty history: the prefix has no rows; the code tokens attend only to each other, so every such
request gets the same distribution (a learned prior). The ranker's user features (sparse, dense,
recency) are not read: in the tokenizer they enter the NS tokens mixed with the candidate's.

Incremental cache (``DecodeState``): step ``t`` projects only the new token and reuses the K/V of
tokens ``0..t-1`` of every layer. ``candidate_prefix_attention`` takes as many queries as own keys,
so the step passes zero queries for the cached rows and keeps the last output: the projections and
MLPs of old tokens are saved, the attention of the padded rows is not (``t + 1`` query rows per
beam at step ``t``; a few levels, so at most ``L``-fold on the attention part).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kernels.candidate_prefix_attention import candidate_prefix_attention
from recsys.data.batch import RequestBatch
from recsys.errors import InputError
from recsys.model.block import rotary
from recsys.model.config import ModelConfig
from recsys.model.ranker import OneTransRanker, PrefixKV, ns_positions
from recsys.retrieval.encoder import s_tokens_of


def user_prefix(ranker: OneTransRanker, batch: RequestBatch) -> PrefixKV:
    """The ranker's per-layer S K/V of ``batch`` (``[sum L_b^l, H, Dh]`` per layer): the decoder's input."""
    return ranker.encode_prefix(*s_tokens_of(ranker, batch))


class CodeBlock(nn.Module):
    """Pre-norm residual block over code tokens with one shared weight set: the S-token half of
    ``OneTransBlock`` (written here because that block also carries per-position NS weights that the
    decoder would leave dead). ``Z = Attn(norm(X)) + X; X' = FFN(norm(Z)) + Z``."""

    def __init__(self, d_model: int, n_heads: int, ffn_hidden: int, rope: bool) -> None:
        super().__init__()
        self.d, self.h, self.dh, self.rope = d_model, n_heads, d_model // n_heads, rope
        self.norm1 = nn.RMSNorm(d_model, eps=1e-6)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.RMSNorm(d_model, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_hidden), nn.SiLU(), nn.Linear(ffn_hidden, d_model))

    def project(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [M, D]``, ``pos [M]`` -> ``q, k, v [M, H, Dh]`` (rotary on q, k when enabled)."""
        q, k, v = self.qkv(self.norm1(x)).view(-1, 3, self.h, self.dh).unbind(1)
        if self.rope:
            q, k = rotary(q, pos), rotary(k, pos)
        return q, k, v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``x [M, D]`` residual inputs, ``attn [M, H, Dh]`` -> ``[M, D]``."""
        z = x + self.out(attn.reshape(-1, self.d))
        return z + self.ffn(self.norm2(z))


@dataclass
class DecodeState:
    """Incremental decoding state of ``C`` sequences after ``t`` code tokens.

    ``keys[l], values[l]``: ``[C, t, H, Dh]`` K/V of tokens ``0..t-1`` at layer ``l``; ``codes``
    ``[C, max(t - 1, 0)]`` the codes fed so far; ``base_pos [C]`` position of token 0 (the request's
    S length); ``owner [C]`` request of each sequence. The prefix is shared, never copied.
    """

    prefix: PrefixKV
    cand_offsets: torch.Tensor
    owner: torch.Tensor
    base_pos: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    codes: torch.Tensor

    @property
    def t(self) -> int:
        return int(self.keys[0].shape[1])

    def select(self, parent: torch.Tensor) -> DecodeState:
        """Row ``i`` of the result continues row ``parent[i]`` (beam re-selection). A beam may only take
        the cache of a sequence of its own request (they share that request's prefix)."""
        parent = parent.long().reshape(-1)
        if parent.numel() != self.owner.numel() or bool(((parent < 0) | (parent >= parent.numel())).any()):
            raise InputError(f"parent must be [{self.owner.numel()}] row indices, got shape {tuple(parent.shape)}")
        if not torch.equal(self.owner[parent], self.owner):
            raise InputError("parent moves a beam to another request's cache (beams reorder within a request)")
        return DecodeState(self.prefix, self.cand_offsets, self.owner, self.base_pos,
                           [k[parent] for k in self.keys], [v[parent] for v in self.values], self.codes[parent])


class SidDecoder(nn.Module):
    """Next-code log-probabilities over the ranker's prefix (see the module docstring).

    ``cfg``: the ranker's ``ModelConfig`` (width, heads, layers, rotary, attention backend must match the
    prefix); ``num_levels`` ``L`` and ``vocab_size`` ``V`` of the SIDs (``SemanticIds.codes``: ``L`` = the
    semantic levels + the disambiguation level).
    """

    def __init__(self, cfg: ModelConfig, num_levels: int, vocab_size: int) -> None:
        super().__init__()
        if num_levels < 1 or vocab_size < 1:
            raise InputError(f"SID decoder needs num_levels >= 1 and vocab_size >= 1, got {num_levels}, {vocab_size}")
        d = cfg.d_model
        self.num_levels, self.vocab_size, self.backend = int(num_levels), int(vocab_size), cfg.attention_backend
        self.n_heads, self.head_dim = cfg.n_heads, d // cfg.n_heads
        self.start = nn.Parameter(torch.randn(d))
        self.code_emb = nn.Parameter(torch.randn(num_levels - 1, vocab_size, d))  # [L-1, V, D]
        self.blocks = nn.ModuleList(CodeBlock(d, cfg.n_heads, cfg.ffn_mult * d, cfg.rope) for _ in range(cfg.n_layers))
        self.out_norm = nn.RMSNorm(d, eps=1e-6)
        bound = 1.0 / math.sqrt(d)
        self.head_w = nn.Parameter(torch.empty(num_levels, d, vocab_size).uniform_(-bound, bound))  # [L, D, V]
        self.head_b = nn.Parameter(torch.zeros(num_levels, vocab_size))  # [L, V]

    # ---- checks ---------------------------------------------------------------------
    def check_prefix(self, prefix: PrefixKV, cand_offsets: torch.Tensor, num_seqs: int) -> None:
        """Refuse a prefix of another model shape or offsets that do not describe ``num_seqs`` sequences."""
        if len(prefix.keys) != len(self.blocks):
            raise InputError(f"user prefix has {len(prefix.keys)} layers, the decoder {len(self.blocks)} "
                             "(build the decoder from the ranker's ModelConfig)")
        want = (self.n_heads, self.head_dim)
        if any(tuple(k.shape[1:]) != want for k in prefix.keys):
            raise InputError(f"user prefix keys are {[tuple(k.shape) for k in prefix.keys]}; the decoder "
                             f"expects [rows, {want[0]}, {want[1]}] per layer")
        n_req = prefix.offsets[0].numel() - 1
        if cand_offsets.shape != (n_req + 1,) or int(cand_offsets[-1]) != num_seqs:
            raise InputError(f"cand_offsets {tuple(cand_offsets.shape)} (last {int(cand_offsets[-1])}) must be "
                             f"[{n_req + 1}] ending at the {num_seqs} decoded sequences")

    def check_codes(self, codes: torch.Tensor, rows: int, levels: int, what: str) -> None:
        """``codes [rows, levels]`` integer in ``[0, V)`` or ``InputError`` naming the shapes."""
        if codes.ndim != 2 or tuple(codes.shape) != (rows, levels):
            raise InputError(f"{what} have shape {tuple(codes.shape)}; expected [{rows}, {levels}] "
                             f"(rows x SID levels; the decoder has L = {self.num_levels} levels)")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise InputError(f"{what} must be integer codes, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.vocab_size):
            raise InputError(f"{what} {tuple(codes.shape)} hold codes in [{int(codes.min())}, {int(codes.max())}] "
                             f"outside [0, {self.vocab_size}) (an item without a SID has -1: drop it)")

    # ---- pieces ---------------------------------------------------------------------
    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: PrefixKV,
                cand_offsets: torch.Tensor) -> torch.Tensor:
        """``q, k, v [C, n, H, Dh]`` against request prefix + own tokens ``<= i`` -> ``[C, n, H, Dh]``."""
        return candidate_prefix_attention(q, k, v, prefix.keys[layer], prefix.values[layer],
                                          prefix.offsets[layer], cand_offsets, backend=self.backend)

    def _logprobs(self, x: torch.Tensor, level0: int) -> torch.Tensor:
        """Top outputs ``x [C, n, D]`` of tokens ``level0 .. level0 + n - 1`` -> log-probs ``[C, n, V]``."""
        n = x.shape[1]
        h = self.out_norm(x)
        logits = torch.einsum("cnd,ndv->cnv", h, self.head_w[level0:level0 + n]) + self.head_b[level0:level0 + n]
        return torch.log_softmax(logits.float(), -1).to(x.dtype)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [C, t]`` (``t < L``) -> input tokens ``[C, t + 1, D]``: start, then each code's level row."""
        c, t = codes.shape
        start = self.start.expand(c, 1, -1)
        if t == 0:
            return start
        rows = self.code_emb[torch.arange(t), codes.long()]  # [C, t, D]
        return torch.cat([start, rows], 1)

    # ---- no cache: every token from scratch (teacher forcing, reference) -------------
    def forward(self, prefix: PrefixKV, codes: torch.Tensor, cand_offsets: torch.Tensor) -> torch.Tensor:
        """``codes [C, t]`` (``0 <= t < L``) -> ``[C, t + 1, V]``: log-probs of code ``i`` after codes ``< i``,
        for ``i = 0..t``, all tokens run from scratch. ``cand_offsets [R+1]``: request ``r`` owns sequences
        ``cand_offsets[r]:cand_offsets[r+1]``."""
        if codes.ndim != 2 or codes.shape[1] >= self.num_levels:
            raise InputError(f"codes fed to the decoder have shape {tuple(codes.shape)}; expected [C, t < "
                             f"{self.num_levels}]")
        self.check_codes(codes, codes.shape[0], codes.shape[1], "decoder input codes")
        self.check_prefix(prefix, cand_offsets, codes.shape[0])
        x = self.embed(codes)  # [C, n, D]
        c, n, d = x.shape
        pos = ns_positions(prefix.offsets[0], cand_offsets, n)  # [C, n]
        for layer, blk in enumerate(self.blocks):
            q, k, v = blk.project(x.reshape(c * n, d), pos.reshape(-1))
            shape = (c, n, self.n_heads, self.head_dim)
            attn = self._attend(layer, q.view(shape), k.view(shape), v.view(shape), prefix, cand_offsets)
            x = blk.finish(x.reshape(c * n, d), attn.reshape(c * n, *shape[2:])).view(c, n, d)
        return self._logprobs(x, 0)

    # ---- incremental ------------------------------------------------------------------
    def begin(self, prefix: PrefixKV, cand_offsets: torch.Tensor) -> DecodeState:
        """Empty state for ``cand_offsets[-1]`` sequences over ``prefix`` (no token yet)."""
        c = int(cand_offsets[-1])
        self.check_prefix(prefix, cand_offsets, c)
        counts = cand_offsets[1:] - cand_offsets[:-1]
        owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        ref = prefix.keys[0]
        empty = ref.new_zeros(c, 0, self.n_heads, self.head_dim)
        return DecodeState(prefix, cand_offsets, owner, ns_positions(prefix.offsets[0], cand_offsets, 1)[:, 0],
                           [empty] * len(self.blocks), [empty] * len(self.blocks),
                           torch.zeros(c, 0, dtype=torch.int64, device=ref.device))

    def step(self, state: DecodeState, codes: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeState]:
        """Feed one token per sequence -> (log-probs of code ``t`` ``[C, V]``, the state after it).

        ``t = state.t``: at ``t = 0`` the start token (``codes`` None); else ``codes [C]``, the code chosen
        at level ``t - 1``. Only the new token is projected; tokens ``< t`` come from the state."""
        t, c = state.t, state.owner.numel()
        if t >= self.num_levels:
            raise InputError(f"the decoder already emitted all {self.num_levels} SID levels")
        if t == 0:
            x = self.start.expand(c, -1)
        else:
            if codes is None:
                raise InputError(f"step {t} needs the codes chosen at level {t - 1}, [{c}]")
            self.check_codes(codes.reshape(-1, 1), c, 1, f"codes of level {t - 1}")
            codes = codes.reshape(-1).long()
            x = self.code_emb[t - 1, codes]
        pos = state.base_pos + t  # [C]
        keys, values = [], []
        for layer, blk in enumerate(self.blocks):
            q, k, v = blk.project(x, pos)  # [C, H, Dh]
            k_all = torch.cat([state.keys[layer], k.unsqueeze(1)], 1)  # [C, t + 1, H, Dh]
            v_all = torch.cat([state.values[layer], v.unsqueeze(1)], 1)
            q_all = torch.cat([q.new_zeros(c, t, *q.shape[1:]), q.unsqueeze(1)], 1)  # cached rows: outputs unused
            attn = self._attend(layer, q_all, k_all, v_all, state.prefix, state.cand_offsets)[:, t]
            x = blk.finish(x, attn)
            keys.append(k_all)
            values.append(v_all)
        fed = state.codes if t == 0 else torch.cat([state.codes, codes.unsqueeze(1)], 1)
        new = DecodeState(state.prefix, state.cand_offsets, state.owner, state.base_pos, keys, values, fed)
        return self._logprobs(x.unsqueeze(1), t)[:, 0], new


def sid_logprob(decoder: SidDecoder, user_prefix: PrefixKV, codes: torch.Tensor,
                cand_offsets: torch.Tensor) -> torch.Tensor:
    """Teacher forcing: ``codes [C, L]`` (whole SIDs, rows of ``SemanticIds.codes``; request ``r`` of
    ``user_prefix`` owns rows ``cand_offsets[r]:cand_offsets[r+1]``) -> ``[C]``
    ``sum_l log p(code_l | history of its request, code_<l)``."""
    decoder.check_codes(codes, codes.shape[0] if codes.ndim == 2 else -1, decoder.num_levels, "target codes")
    target = codes.long()
    logp = decoder(user_prefix, target[:, :-1], cand_offsets)  # [C, L, V]
    return logp.gather(2, target.unsqueeze(2)).squeeze(2).sum(1)


def sid_nll(decoder: SidDecoder, user_prefix: PrefixKV, target_codes: torch.Tensor) -> torch.Tensor:
    """Teacher forcing: ``target_codes [B, L]`` (one target SID per request of ``user_prefix``, rows of
    ``SemanticIds.codes``) -> scalar ``mean_b sum_l -log p(code_l | history_b, code_<l)``."""
    b = user_prefix.offsets[0].numel() - 1
    decoder.check_codes(target_codes, b, decoder.num_levels, "target codes")
    cand_offsets = torch.arange(b + 1, device=target_codes.device)
    return -sid_logprob(decoder, user_prefix, target_codes, cand_offsets).mean()
