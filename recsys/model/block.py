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

from kernels import cpu_native


def _uniform_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


class PerPositionLinear(nn.Module):
    """N independent linear maps, one per NS position: ``[M, N, in] -> [M, N, out]``."""

    def __init__(self, n: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(_uniform_(torch.empty(n, d_in, d_out), d_in))
        self.bias = nn.Parameter(_uniform_(torch.empty(n, d_out), d_in))

    def forward(self, x: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """``bf16``: the product in bf16 from the fp32 weights, output bf16 (the caller casts back)."""
        if bf16:
            m = x.shape[0]
            return torch.einsum("mni,nio->mno", bf16_bucket_rows(x), self.weight.bfloat16())[:m] + self.bias.bfloat16()
        if torch.is_autocast_enabled(x.device.type):
            # einsum is not on autocast's lower-precision list: under train.bf16 it stayed fp32 and met the S side's
            # bf16 keys in the attention op. baddbmm (listed) runs in bf16; its transposed output costs a copy,
            # measured 5-13% slower than the einsum in fp32, so fp32 keeps the einsum.
            out = torch.baddbmm(self.bias.unsqueeze(1), x.transpose(0, 1), self.weight)  # [N, M, out]
            return out.transpose(0, 1).contiguous()
        return torch.einsum("mni,nio->mno", x, self.weight) + self.bias


class PerPositionRMSNorm(nn.Module):
    """RMSNorm with a separate gain per NS position: ``[M, N, D] -> [M, N, D]``."""

    def __init__(self, n: int, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight


def bucket_rows(m: int) -> int:
    """``m`` rounded up to one of 8 sizes per octave (<= 12.5% padding; exact below 16)."""
    step = 1 << max(m.bit_length() - 4, 0)
    return -(-m // step) * step


def bf16_bucket_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [M, ...]`` in bf16 with zero rows appended up to :func:`bucket_rows` ``(M)``.

    oneDNN builds (JIT) and caches a bf16 matmul per shape. In training every batch brings a new S row count:
    one new build per matmul, direction and step cost more than bf16 saved, and the cache of them grew the
    process by ~1.8 GB in 60 steps (docs/performance.md). Bucketed, the shapes repeat; zero rows change
    no real row's product and add nothing to the weight gradient.
    """
    m = x.shape[0]
    x = x.bfloat16()
    extra = bucket_rows(m) - m
    return x if extra == 0 else F.pad(x, (0, 0) * (x.dim() - 1) + (0, extra))


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.linear`` as a bf16 matmul from fp32 ``weight [out, in]``, ``bias [out]``: ``x [M, in]`` -> bf16 ``[M, out]``."""
    return F.linear(bf16_bucket_rows(x), weight.bfloat16(), bias.bfloat16())[: x.shape[0]]


def dense(x: torch.Tensor, layer: nn.Linear, bf16: bool) -> torch.Tensor:
    """``layer(x)``, or with ``bf16`` the same product in bf16 from its fp32 weights (output bf16)."""
    return linear_bf16(x, layer.weight, layer.bias) if bf16 else layer(x)


def _angles(pos: torch.Tensor, half: int, base: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [..., half]`` of integer positions ``pos [...]`` (computed once, shared by q and k)."""
    inv_freq = base ** (-torch.arange(half, device=pos.device, dtype=torch.float32) / half)
    ang = pos.to(torch.float32)[..., None] * inv_freq
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """``out = rotate-half(x)`` by the angles: ``x, out [..., H, Dh]``, ``cos, sin [..., 1, Dh/2]``.

    Written into the halves of ``out`` (two products and two fused multiply-adds, no ``cat``); the
    same rounding as ``cat([x1 c - x2 s, x1 s + x2 c])``.
    """
    half = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)


class _RotaryParts(torch.autograd.Function):
    """Split ``x [..., P, H, Dh]`` into P contiguous ``[..., H, Dh]`` parts, the first ``n_rot`` rotated.

    Hand-written (no library has a CPU rotate-half): one pass over q and k, no ``cat``, and autograd
    keeps only ``cos, sin`` (the backward of a rotation is the rotation by the opposite angle), not
    the four products of the obvious form.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, n_rot: int):  # noqa: ANN001, ANN205
        ctx.n_rot = n_rot
        ctx.native = cpu_native.rotary_supported(x) and cos.shape[:-1] == x.shape[:-3]  # native: no broadcasting
        ctx.save_for_backward(cos, sin)
        if ctx.native:  # one native pass instead of four strided half-row ATen passes per part
            return tuple(cpu_native.rotary_parts(x, cos, sin, n_rot))
        cos, sin = cos[..., None, :], sin[..., None, :]  # [..., 1, Dh/2]: broadcast over heads
        outs = []
        for p in range(x.shape[-3]):
            part = x.select(-3, p)
            out = torch.empty(part.shape, dtype=x.dtype, device=x.device)
            if p < n_rot:
                _rotate_into(out, part, cos, sin)
            else:
                out.copy_(part)
            outs.append(out)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):  # noqa: ANN001, ANN205
        cos, sin = ctx.saved_tensors
        if ctx.native:
            return cpu_native.unrotary_parts(list(grads), cos, sin, ctx.n_rot), None, None, None
        cos, sin = cos[..., None, :], sin[..., None, :]
        ref = next(g for g in grads if g is not None)
        gx = torch.empty(*ref.shape[:-2], len(grads), *ref.shape[-2:], dtype=ref.dtype, device=ref.device)
        for p, g in enumerate(grads):
            slot = gx.select(-3, p)
            if g is None:
                slot.zero_()
            elif p < ctx.n_rot:
                _rotate_into(slot, g, cos, -sin)
            else:
                slot.copy_(g)
        return gx, None, None, None


def rotary_parts(x: torch.Tensor, pos: torch.Tensor, n_rot: int, base: float = 10000.0
                 ) -> tuple[torch.Tensor, ...]:
    """Rotary on the first ``n_rot`` of the P parts of ``x [..., P, H, Dh]`` (e.g. q, k of a fused
    qkv projection), integer ``pos [...]`` -> P contiguous ``[..., H, Dh]``; the others are copied."""
    cos, sin = _angles(pos, x.shape[-1] // 2, base, x.dtype)
    return _RotaryParts.apply(x, cos, sin, n_rot)


def rotary(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (rotate-half form): ``x [M, H, Dh]``, integer ``pos [M]`` -> ``[M, H, Dh]``.

    Scores ``q_i . k_j`` then depend on ``i - j`` only, which is what lets an NS query tell how
    recent an S token is. Positions count from the first S token of the sequence, so appending
    events leaves every existing token's rotation unchanged (the KV cache stays exact).
    """
    return rotary_parts(x.unsqueeze(-3), pos, 1, base)[0]


def rotary_reference(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """The obvious form of :func:`rotary` (``cat`` of the two rotated halves), for tests and benches."""
    half = x.shape[-1] // 2
    cos, sin = _angles(pos, half, base, x.dtype)
    cos, sin = cos[:, None, :], sin[:, None, :]  # [M, 1, Dh/2]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class OneTransBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn_hidden: int, n_ns: int, rope: bool = True,
                 dense_bf16: bool = False) -> None:
        super().__init__()
        self.d, self.h, self.dh = d_model, n_heads, d_model // n_heads
        self.bf16 = dense_bf16  # projections and FFNs as bf16 matmuls (ModelConfig.dense_bf16)
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

    def s_project(self, x: torch.Tensor, keep: torch.Tensor | None, pos: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [M, D]`` S-token inputs, ``keep [M_q]`` rows that emit queries (``None``: every row, in
        order), ``pos [M]`` their positions in the S sequence (0 = oldest event; needed with rotary positions).

        Returns ``q [M_q, H, Dh]``, ``k, v [M, H, Dh]``. Queries are projected only for the
        kept rows (the pyramid saving); keys/values for every row. With ``keep=None`` one fused
        Q/K/V projection and one rotary pass, and no row gather (whose backward is a scatter-add).
        """
        self._check_pos(pos)
        h = self.s_norm1(x)
        w, b = self.s_qkv.weight, self.s_qkv.bias
        linear = linear_bf16 if self.bf16 else F.linear  # .float() below: a no-op in fp32
        if keep is None:
            qkv = linear(h, w, b).float().view(-1, 3, self.h, self.dh)
            return qkv.unbind(1) if not self.rope else rotary_parts(qkv, pos, 2)
        d = self.d
        q = linear(h[keep], w[:d], b[:d]).float().view(-1, self.h, self.dh)
        kv = linear(h, w[d:], b[d:]).float().view(-1, 2, self.h, self.dh)
        if not self.rope:
            k, v = kv.unbind(1)  # [M, H, Dh] each
            return q, k, v
        cos, sin = _angles(pos, self.dh // 2, 10000.0, q.dtype)  # once for k, gathered for q
        k, v = _RotaryParts.apply(kv, cos, sin, 1)
        (q,) = _RotaryParts.apply(q.unsqueeze(1), cos[keep], sin[keep], 1)
        return q, k, v

    def s_finish(self, x_kept: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``x_kept [M_q, D]`` residual inputs of the query rows, ``attn [M_q, H, Dh]`` -> ``[M_q, D]``."""
        z = x_kept + dense(attn.reshape(-1, self.d), self.s_out, self.bf16).float()
        if not self.bf16:
            return z + self.s_ffn(self.s_norm2(z))
        h = F.silu(dense(self.s_norm2(z), self.s_ffn[0], True))
        return z + dense(h, self.s_ffn[2], True).float()

    # ---- NS tokens ---------------------------------------------------------------
    def ns_project(self, x: torch.Tensor, pos: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [C, N, D]``, ``pos [C, N]`` (= the request's S length + n) -> ``q, k, v [C, N, H, Dh]``."""
        self._check_pos(pos)
        qkv = self.ns_qkv(self.ns_norm1(x), self.bf16).float()  # [C, N, 3D]
        qkv = qkv.view(x.shape[0], x.shape[1], 3, self.h, self.dh)
        if not self.rope:
            return qkv.unbind(2)
        return rotary_parts(qkv, pos, 2)  # q and k rotated in one pass, v copied out contiguous

    def ns_finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``x [C, N, D]``, ``attn [C, N, H, Dh]`` -> ``[C, N, D]``."""
        z = x + self.ns_out(attn.reshape(x.shape[0], x.shape[1], self.d), self.bf16).float()
        return z + self.ns_ffn2(F.silu(self.ns_ffn1(self.ns_norm2(z), self.bf16)), self.bf16).float()
