"""``torch.library`` custom ops (namespace ``recsys``) for the torch and Triton backends.

Each backend is a forward op returning ``(out, lse)`` and a backward op, tied together with
``register_autograd``; ``register_fake`` gives shapes to ``torch.compile`` / fake tensors, so a
compiled model sees one opaque node per attention call (the host sync that reads the offsets
happens inside the op, not in the traced graph).

    op                                             returns
    recsys::jagged_causal_attention_{torch,triton}        out [sum q_i, H, Dh], lse [H, sum q_i] fp32
    recsys::jagged_causal_attention_{torch,triton}_bwd    dq, dk, dv
    recsys::candidate_prefix_attention_{torch,triton}     out [sum C_b, N, H, Dh], lse [H, sum C_b * N]
    recsys::candidate_prefix_attention_{torch,triton}_bwd dq, dk, dv, dprefix_k, dprefix_v

``lse`` is an implementation detail passed from forward to backward (natural log for torch,
base 2 for Triton); the public functions return ``out`` only. Triton modules are imported inside
the Triton implementations, so importing this module never imports or decorates Triton kernels.
"""

from __future__ import annotations

import importlib

import torch

_IMPLS = {
    ("jagged", "torch"): "kernels.torch_attention",
    ("jagged", "triton"): "kernels.triton_jagged_causal_attention",
    ("cand", "torch"): "kernels.torch_attention",
    ("cand", "triton"): "kernels.triton_candidate_prefix_attention",
}
_FNS = {
    ("jagged", "torch"): ("jagged_causal_attention_torch_fwd", "jagged_causal_attention_torch_bwd"),
    ("jagged", "triton"): ("jagged_causal_attention_fwd", "jagged_causal_attention_bwd"),
    ("cand", "torch"): ("candidate_prefix_attention_torch_fwd", "candidate_prefix_attention_torch_bwd"),
    ("cand", "triton"): ("candidate_prefix_attention_fwd", "candidate_prefix_attention_bwd"),
}


def _impl(op: str, backend: str, direction: int):
    module = importlib.import_module(_IMPLS[op, backend])  # lazy: Triton decorates on first use
    return getattr(module, _FNS[op, backend][direction])


def _contig(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.contiguous() for t in ts]


def _register_jagged(backend: str):
    name = f"recsys::jagged_causal_attention_{backend}"

    @torch.library.custom_op(name, mutates_args=())
    def fwd(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_offsets: torch.Tensor,
        q_offsets: torch.Tensor | None,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = _contig(q, k, v)
        return _impl("jagged", backend, 0)(q, k, v, kv_offsets, q_offsets, scale)

    @fwd.register_fake
    def _(q, k, v, kv_offsets, q_offsets, scale):
        return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)

    @torch.library.custom_op(name + "_bwd", mutates_args=())
    def bwd(
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        kv_offsets: torch.Tensor,
        q_offsets: torch.Tensor | None,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dout, q, k, v, out = _contig(dout, q, k, v, out)
        return _impl("jagged", backend, 1)(dout, q, k, v, out, lse, kv_offsets, q_offsets, scale)

    @bwd.register_fake
    def _(dout, q, k, v, out, lse, kv_offsets, q_offsets, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, kv_offsets, q_offsets, scale = inputs
        ctx.scale = scale
        ctx.has_q_offsets = q_offsets is not None
        ctx.save_for_backward(q, k, v, *output, kv_offsets, q_offsets if q_offsets is not None else kv_offsets)

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, kv_offsets, q_offsets = ctx.saved_tensors
        q_offsets = q_offsets if ctx.has_q_offsets else None
        dq, dk, dv = bwd(dout, q, k, v, out, lse, kv_offsets, q_offsets, ctx.scale)
        return dq, dk, dv, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd


def _register_candidates(backend: str):
    name = f"recsys::candidate_prefix_attention_{backend}"

    @torch.library.custom_op(name, mutates_args=())
    def fwd(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prefix_k: torch.Tensor,
        prefix_v: torch.Tensor,
        prefix_offsets: torch.Tensor,
        cand_offsets: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v, prefix_k, prefix_v = _contig(q, k, v, prefix_k, prefix_v)
        return _impl("cand", backend, 0)(q, k, v, prefix_k, prefix_v, prefix_offsets, cand_offsets, scale)

    @fwd.register_fake
    def _(q, k, v, prefix_k, prefix_v, prefix_offsets, cand_offsets, scale):
        lse = q.new_empty((q.shape[2], q.shape[0] * q.shape[1]), dtype=torch.float32)
        return torch.empty_like(q), lse

    @torch.library.custom_op(name + "_bwd", mutates_args=())
    def bwd(
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prefix_k: torch.Tensor,
        prefix_v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        prefix_offsets: torch.Tensor,
        cand_offsets: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dout, q, k, v, prefix_k, prefix_v, out = _contig(dout, q, k, v, prefix_k, prefix_v, out)
        return _impl("cand", backend, 1)(
            dout, q, k, v, prefix_k, prefix_v, out, lse, prefix_offsets, cand_offsets, scale
        )

    @bwd.register_fake
    def _(dout, q, k, v, prefix_k, prefix_v, out, lse, prefix_offsets, cand_offsets, scale):
        return tuple(torch.empty_like(t) for t in (q, k, v, prefix_k, prefix_v))

    def setup_context(ctx, inputs, output):
        q, k, v, prefix_k, prefix_v, prefix_offsets, cand_offsets, scale = inputs
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, *output, prefix_offsets, cand_offsets)

    def backward(ctx, dout, _dlse):
        q, k, v, prefix_k, prefix_v, out, lse, prefix_offsets, cand_offsets = ctx.saved_tensors
        grads = bwd(dout, q, k, v, prefix_k, prefix_v, out, lse, prefix_offsets, cand_offsets, ctx.scale)
        return (*grads, None, None, None)

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd


_jagged_torch = _register_jagged("torch")
_jagged_triton = _register_jagged("triton")
_cand_torch = _register_candidates("torch")
_cand_triton = _register_candidates("triton")


def jagged_causal_attention_torch_op(q, k, v, kv_offsets, q_offsets, scale: float) -> torch.Tensor:
    return _jagged_torch(q, k, v, kv_offsets, q_offsets, scale)[0]


def jagged_causal_attention_triton_op(q, k, v, kv_offsets, q_offsets, scale: float) -> torch.Tensor:
    return _jagged_triton(q, k, v, kv_offsets, q_offsets, scale)[0]


def candidate_prefix_attention_torch_op(q, k, v, prefix_k, prefix_v, prefix_offsets, cand_offsets, scale: float):
    return _cand_torch(q, k, v, prefix_k, prefix_v, prefix_offsets, cand_offsets, scale)[0]


def candidate_prefix_attention_triton_op(q, k, v, prefix_k, prefix_v, prefix_offsets, cand_offsets, scale: float):
    return _cand_triton(q, k, v, prefix_k, prefix_v, prefix_offsets, cand_offsets, scale)[0]
