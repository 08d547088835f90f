"""Vector-quantized long-term memory (VQL-style): attention over L old events in O(M) per query.

Shape legend: ``B`` users (requests), ``E`` old events (jagged over users, ``owner [E]``),
``C`` queries (candidates, ``owner_c [C]``), ``M`` codes, ``Dk`` key width, ``Dv`` value width.

Only the *keys* are quantized: event ``j`` gets the unit key ``k_j = normalize(W_k x_j)`` and code
``m(j) = argmax_m k_j . c_m`` over unit codewords ``c_m = normalize(codebook_m)`` (spherical VQ:
with raw keys and codewords, small keys all fell into the few codewords of smallest norm, leaving
most codes unused); its value ``v_j = W_v x_j`` stays exact. Attention of a
query ``q`` over the events with their keys replaced by their codewords,

    sum_j exp(q.c_m(j)) v_j / sum_j exp(q.c_m(j))
      = sum_m exp(q.c_m) S_m / sum_m exp(q.c_m) N_m,   S_m = sum_{m(j)=m} v_j,  N_m = #{j: m(j)=m},

needs only the per-user state ``(S [M, Dv], N [M])``: its size does not depend on how many
events it summarises, a new event updates one row in O(M Dk + Dv) (assign + add), and a query
costs O(M (Dk + Dv)). When every distinct key is its own codeword the result is exact attention
(``tests/longseq/test_memory.py``). The state depends on the user's events only
(candidate-independent), so it is cached per user like the S-token K/V.

Training the keys: the code assignment is an argmin (no gradient), so in training mode the
logits use ``c_m + (kbar_m - sg(kbar_m))`` where ``kbar_m`` is the mean key of the user's events
in code ``m``: the same value as ``c_m`` (outputs unchanged) but the logit gradient also reaches
the member keys (a straight-through estimator), so ``W_k`` learns alongside the codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MemoryState:
    """Per-user memory: ``sums [B, M, Dv]`` (S_m), ``counts [B, M]`` (N_m, float).

    ``key_sums [B, M, Dk]``: sum of member keys, kept only in training (straight-through
    gradient); ``None`` in serving states.
    """

    sums: torch.Tensor
    counts: torch.Tensor
    key_sums: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the serving state (``M x (Dv + 1)`` floats per user; independent of history length)."""
        return sum(t.numel() * t.element_size() for t in (self.sums, self.counts))

    def select(self, users: torch.Tensor) -> MemoryState:
        """States of ``users [B']`` (rows of this batch of states)."""
        ks = None if self.key_sums is None else self.key_sums[users]
        return MemoryState(self.sums[users], self.counts[users], ks)


class VQMemory(nn.Module):
    """Keys/values of old events, a learned codebook, the aggregated state and its O(M) read."""

    def __init__(self, in_dim: int, key_dim: int, value_dim: int, codebook_size: int,
                 key_in_dim: int | None = None) -> None:
        """Events are ``feats [E, in_dim]``; keys read their first ``key_in_dim`` columns (default all)."""
        super().__init__()
        self.key_in = key_in_dim or in_dim
        self.key = nn.Linear(self.key_in, key_dim, bias=False)
        self.value = nn.Linear(in_dim, value_dim)
        self.codebook = nn.Parameter(torch.randn(codebook_size, key_dim) * 0.1)
        self.scale = key_dim ** -0.5

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    def codewords(self) -> torch.Tensor:
        """``[M, Dk]`` unit codewords."""
        return nn.functional.normalize(self.codebook, dim=-1)

    def keys(self, feats: torch.Tensor) -> torch.Tensor:
        """``feats [E, in]`` -> unit keys ``[E, Dk]``."""
        return nn.functional.normalize(self.key(feats[..., :self.key_in]), dim=-1)

    def assign(self, keys: torch.Tensor) -> torch.Tensor:
        """Nearest codeword of every unit key: ``keys [E, Dk]`` -> codes ``[E]`` int64 (ties: lowest code)."""
        # unit vectors: argmin ||k - c|| = argmax k.c; [E, M] scores, never [E, M, Dk]
        return torch.argmax(keys.detach() @ self.codewords().detach().T, dim=-1)

    def build(self, feats: torch.Tensor, owner: torch.Tensor, num_users: int) -> MemoryState:
        """State of ``num_users`` users from their old events ``feats [E, in]`` (``owner [E]``)."""
        m = self.codebook_size
        keys = self.keys(feats)  # [E, Dk]
        values = self.value(feats)  # [E, Dv]
        slot = owner * m + self.assign(keys)  # [E] row of the flat [B*M] state
        sums = values.new_zeros(num_users * m, values.shape[-1]).index_add_(0, slot, values)
        counts = values.new_zeros(num_users * m).index_add_(0, slot, torch.ones_like(slot, dtype=values.dtype))
        key_sums = None
        if self.training and torch.is_grad_enabled():
            key_sums = keys.new_zeros(num_users * m, keys.shape[-1]).index_add_(0, slot, keys).view(num_users, m, -1)
        return MemoryState(sums.view(num_users, m, -1), counts.view(num_users, m), key_sums)

    def empty_state(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> MemoryState:
        """One user with no old events (``B = 1``)."""
        m = self.codebook_size
        return MemoryState(torch.zeros(1, m, self.value.out_features, device=device, dtype=dtype),
                           torch.zeros(1, m, device=device, dtype=dtype))

    @torch.no_grad()
    def append(self, state: MemoryState, feats: torch.Tensor) -> MemoryState:
        """Add ``feats [d, in]`` new old events to a one-user state (``B = 1``): O(d) work, any history length.

        Returns a new state (the input is not modified).
        """
        if state.sums.shape[0] != 1:
            raise ValueError(f"append updates one user's state, got a batch of {state.sums.shape[0]}")
        codes = self.assign(self.keys(feats))  # [d]
        sums = state.sums[0].index_add(0, codes, self.value(feats))
        counts = state.counts[0].index_add(0, codes, torch.ones_like(codes, dtype=state.counts.dtype))
        return MemoryState(sums[None], counts[None])

    def read(self, queries: torch.Tensor, state: MemoryState, owner_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of ``queries [C, Dk]`` over their users' memories (``owner_c [C]``).

        Returns ``out [C, Dv]`` (0 for an empty memory) and ``lse [C]``: the log of the
        unnormalised attention mass ``log sum_j exp(q.k_j / sqrt(Dk))`` (0 for an empty memory),
        a "how much of this is in the history" signal, also O(M).
        """
        codes = self.codewords() * self.scale  # [M, Dk]
        if state.key_sums is not None:  # training: straight-through to the member keys (see module doc)
            counts = state.counts[owner_c]  # [C, M]
            kbar = state.key_sums[owner_c] / counts.clamp_min(1)[..., None]  # [C, M, Dk]
            logits = torch.einsum("cd,cmd->cm", queries, codes + (kbar - kbar.detach()) * self.scale)
        else:
            counts = state.counts[owner_c]  # [C, M]
            logits = queries @ codes.T  # [C, M]
        present = counts > 0
        logits = logits.masked_fill(~present, float("-inf"))
        top = logits.amax(-1, keepdim=True)  # [C, 1]
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        w = torch.exp(logits - top) * counts  # [C, M]: exp(q.c_m) N_m, shifted
        mass = w.sum(-1)  # [C]
        num = torch.einsum("cm,cmd->cd", torch.exp(logits - top), state.sums[owner_c])  # [C, Dv]
        empty = mass == 0
        out = num / torch.where(empty, torch.ones_like(mass), mass)[:, None]
        lse = torch.where(empty, torch.zeros_like(mass), torch.log(mass.clamp_min(1e-30)) + top[:, 0])
        return out, lse


def exact_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: plain softmax attention of ``queries [C, Dk]`` over one user's ``keys [L, Dk]``,
    ``values [L, Dv]`` -> (``out [C, Dv]``, ``lse [C]``); zeros when ``L = 0``."""
    if keys.shape[0] == 0:
        return queries.new_zeros(queries.shape[0], values.shape[-1]), queries.new_zeros(queries.shape[0])
    logits = (queries @ keys.T) * scale  # [C, L]
    return torch.softmax(logits, -1) @ values, torch.logsumexp(logits, -1)
