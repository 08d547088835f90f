"""OneTrans block with mixed parameterization.

Pre-norm residual block ``Z = Attn(norm(X)) + X; X' = FFN(norm(Z)) + Z`` where every
S token uses one shared set of norm/QKV/O/FFN weights and each of the N NS-token
positions has its own (weights stacked on a leading ``[N, ...]`` axis).

The block never does attention math itself: it projects, calls an op from
``kernels`` and finishes. The ranker decides how tokens are laid out (request-level
with a shared S prefix, or one full sequence per candidate for the reference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _uniform_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


class PerPositionLinear(nn.Module):
    """N independent linear maps, one per NS position: ``[M, N, in] -> [M, N, out]``."""

    def __init__(self, n: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(_uniform_(torch.empty(n, d_in, d_out), d_in))
        self.bias = nn.Parameter(_uniform_(torch.empty(n, d_out), d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("mni,nio->mno", x, self.weight) + self.bias


class PerPositionRMSNorm(nn.Module):
    """RMSNorm with a separate gain per NS position: ``[M, N, D] -> [M, N, D]``."""

    def __init__(self, n: int, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight


def rotary(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (rotate-half form): ``x [M, H, Dh]``, integer ``pos [M]`` -> ``[M, H, Dh]``.

    Scores ``q_i . k_j`` then depend on ``i - j`` only, which is what lets an NS query tell how
    recent an S token is. Positions count from the first S token of the sequence, so appending
    events leaves every existing token's rotation unchanged (the KV cache stays exact).
    """
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = pos.to(torch.float32)[:, None] * inv_freq  # [M, Dh/2]
    cos, sin = ang.cos()[:, None, :].to(x.dtype), ang.sin()[:, None, :].to(x.dtype)  # [M, 1, Dh/2]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class OneTransBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn_hidden: int, n_ns: int, rope: bool = True) -> None:
        super().__init__()
        self.d, self.h, self.dh = d_model, n_heads, d_model // n_heads
        if rope and self.dh % 2:
            raise ValueError(f"rotary positions need an even head dim, got {self.dh}")
        self.rope = rope
        # S tokens: one shared set of weights.
        self.s_norm1 = nn.RMSNorm(d_model, eps=1e-6)
        self.s_qkv = nn.Linear(d_model, 3 * d_model)
        self.s_out = nn.Linear(d_model, d_model)
        self.s_norm2 = nn.RMSNorm(d_model, eps=1e-6)
        self.s_ffn = nn.Sequential(nn.Linear(d_model, ffn_hidden), nn.SiLU(), nn.Linear(ffn_hidden, d_model))
        # NS tokens: every position its own weights.
        self.ns_norm1 = PerPositionRMSNorm(n_ns, d_model)
        self.ns_qkv = PerPositionLinear(n_ns, d_model, 3 * d_model)
        self.ns_out = PerPositionLinear(n_ns, d_model, d_model)
        self.ns_norm2 = PerPositionRMSNorm(n_ns, d_model)
        self.ns_ffn1 = PerPositionLinear(n_ns, d_model, ffn_hidden)
        self.ns_ffn2 = PerPositionLinear(n_ns, ffn_hidden, d_model)

    # ---- S tokens ----------------------------------------------------------------
    def _check_pos(self, pos: torch.Tensor | None) -> None:
        if self.rope and pos is None:
            raise ValueError("this block uses rotary positions: pass the token positions")

    def s_project(self, x: torch.Tensor, keep: torch.Tensor, pos: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [M, D]`` S-token inputs, ``keep [M_q]`` rows that emit queries, ``pos [M]`` their
        positions in the S sequence (0 = oldest event; needed with rotary positions).

        Returns ``q [M_q, H, Dh]``, ``k, v [M, H, Dh]``. Queries are projected only for the
        kept rows (the pyramid saving); keys/values for every row.
        """
        self._check_pos(pos)
        h = self.s_norm1(x)
        w, b = self.s_qkv.weight, self.s_qkv.bias
        d = self.d
        q = F.linear(h[keep], w[:d], b[:d]).view(-1, self.h, self.dh)
        kv = F.linear(h, w[d:], b[d:])
        k, v = kv.view(-1, 2, self.h, self.dh).unbind(1)  # [M, H, Dh] each
        if self.rope:
            q, k = rotary(q, pos[keep]), rotary(k, pos)
        return q, k, v

    def s_finish(self, x_kept: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``x_kept [M_q, D]`` residual inputs of the query rows, ``attn [M_q, H, Dh]`` -> ``[M_q, D]``."""
        z = x_kept + self.s_out(attn.reshape(-1, self.d))
        return z + self.s_ffn(self.s_norm2(z))

    # ---- NS tokens ---------------------------------------------------------------
    def ns_project(self, x: torch.Tensor, pos: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [C, N, D]``, ``pos [C, N]`` (= the request's S length + n) -> ``q, k, v [C, N, H, Dh]``."""
        self._check_pos(pos)
        qkv = self.ns_qkv(self.ns_norm1(x))  # [C, N, 3D]
        q, k, v = qkv.view(x.shape[0], x.shape[1], 3, self.h, self.dh).unbind(2)
        if self.rope:
            c, n = x.shape[:2]
            flat = pos.reshape(-1)
            q = rotary(q.reshape(c * n, self.h, self.dh), flat).view(c, n, self.h, self.dh)
            k = rotary(k.reshape(c * n, self.h, self.dh), flat).view(c, n, self.h, self.dh)
        return q, k, v

    def ns_finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``x [C, N, D]``, ``attn [C, N, H, Dh]`` -> ``[C, N, D]``."""
        z = x + self.ns_out(attn.reshape(x.shape[0], x.shape[1], self.d))
        return z + self.ns_ffn2(F.silu(self.ns_ffn1(self.ns_norm2(z))))
