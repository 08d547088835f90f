"""Build and call the small-head CPU attention kernels (``kernels/cpu/small_head_attention.cpp``).

The C++ file is compiled on first use with the machine's ``g++`` (``-O3 -march=native -fopenmp``, ~3 s)
into a cache folder (``$RECSYS_KERNEL_CACHE``, default ``~/.cache/recsys/kernels``) under a name that
hashes the source, the flags and the CPU's feature flags, so a checkout moved to another machine builds
again instead of running instructions that CPU lacks. The library is a plain C ABI called through
``ctypes`` with raw pointers of contiguous fp32 tensors (no torch headers: a 3 s build, not a minute),
and its OpenMP threads are torch's own (the same ``libgomp.so.1``, already loaded by torch), sized by
``torch.get_num_threads()``.

:func:`library` returns ``None`` (and says why once, on stderr) where there is no compiler or the build
fails, or when ``RECSYS_NATIVE_ATTENTION=0``; the torch backend then runs ATen's flash kernels instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "cpu" / "small_head_attention.cpp"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
HEAD_DIMS = (16, 32, 48, 64)  # the head sizes the library is built for (its DISPATCH)

_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "recsys_jagged_fwd": [_P] * 5 + [_I64, _INT, _INT, _F, _P, _P, _INT],
    "recsys_jagged_bwd": [_P] * 8 + [_I64, _INT, _INT, _F, _P, _P, _P, _INT],
    "recsys_prefix_fwd": [_P] * 7 + [_I64, _INT, _INT, _INT, _F, _P, _P, _INT],
    "recsys_prefix_bwd": [_P] * 10 + [_I64, _INT, _INT, _INT, _F] + [_P] * 5 + [_INT],
    "recsys_rotary": [_P, _I64, _P, _I64, _P, _P, _I64, _INT, _INT, _INT, _INT, _F, _INT],
}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("RECSYS_KERNEL_CACHE", Path.home() / ".cache" / "recsys" / "kernels"))


def _build(compiler: str) -> Path:
    """Compile into the cache (atomic rename: concurrent builders, e.g. test workers, never see half a file)."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    target = _cache_dir() / f"small_head_attention-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed:\n{proc.stderr[-2000:]}")
        os.replace(out, target)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or ``None`` (native kernels off or unbuildable: reason printed once)."""
    if os.environ.get("RECSYS_NATIVE_ATTENTION", "1") == "0":
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if compiler is None:
        print("[recsys] no g++ found: CPU attention runs ATen's flash kernels (slower at small heads)", file=sys.stderr)
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError) as err:
        print(f"[recsys] small-head CPU attention kernels unavailable ({err}); using ATen's", file=sys.stderr)
        return None
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def supports(*tensors: torch.Tensor) -> bool:
    """True when the native kernels take these tensors: CPU fp32, a built head size, library available."""
    t = tensors[0]
    return (
        t.device.type == "cpu"
        and t.shape[-1] in HEAD_DIMS
        and all(x.dtype == torch.float32 for x in tensors)
        and library() is not None
    )


def _ptrs(*tensors: torch.Tensor | None) -> list[int | None]:
    return [None if t is None else t.data_ptr() for t in tensors]


def _check(rc: int) -> None:
    if rc != 0:
        raise ValueError("small-head CPU kernel: shape not supported (head size not built, odd rotary size)")


def _offsets(x: torch.Tensor) -> torch.Tensor:
    return x.to(device="cpu", dtype=torch.int64).contiguous()


def jagged_fwd(q, k, v, kv_offsets, q_offsets, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [sum q_i, H, D]``, ``k, v [sum L_i, H, D]`` -> ``out [sum q_i, H, D]``, ``lse [H, sum q_i]``."""
    kv = _offsets(kv_offsets)
    qo = kv if q_offsets is None else _offsets(q_offsets)
    q, k, v = (x.contiguous() for x in (q, k, v))
    rows, h, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((h, rows), dtype=torch.float32)
    _check(library().recsys_jagged_fwd(*_ptrs(q, k, v, kv, qo), kv.numel() - 1, h, d, scale,
                                       *_ptrs(out, lse), torch.get_num_threads()))
    return out, lse


def jagged_bwd(dout, q, k, v, out, lse, kv_offsets, q_offsets, scale: float):
    """Gradients ``(dq, dk, dv)`` of :func:`jagged_fwd` from its ``out`` and ``lse``."""
    kv = _offsets(kv_offsets)
    qo = kv if q_offsets is None else _offsets(q_offsets)
    dout, q, k, v, out, lse = (x.contiguous() for x in (dout, q, k, v, out, lse))
    _, h, d = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _check(library().recsys_jagged_bwd(*_ptrs(dout, q, k, v, out, lse, kv, qo), kv.numel() - 1, h, d, scale,
                                       *_ptrs(dq, dk, dv), torch.get_num_threads()))
    return dq, dk, dv


def prefix_fwd(q, k, v, prefix_k, prefix_v, prefix_offsets, cand_offsets, scale: float):
    """``q, k, v [sum C_b, N, H, D]``, ``prefix_k/v [sum L_b, H, D]`` -> ``out [sum C_b, N, H, D]``,
    ``lse [H, sum C_b * N]``."""
    po, co = _offsets(prefix_offsets), _offsets(cand_offsets)
    q, k, v, prefix_k, prefix_v = (x.contiguous() for x in (q, k, v, prefix_k, prefix_v))
    c, n, h, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((h, c * n), dtype=torch.float32)
    _check(library().recsys_prefix_fwd(*_ptrs(q, k, v, prefix_k, prefix_v, po, co), po.numel() - 1, n, h, d, scale,
                                       *_ptrs(out, lse), torch.get_num_threads()))
    return out, lse


def prefix_bwd(dout, q, k, v, prefix_k, prefix_v, out, lse, prefix_offsets, cand_offsets, scale: float):
    """Gradients ``(dq, dk, dv, dprefix_k, dprefix_v)`` of :func:`prefix_fwd` from its ``out`` and ``lse``."""
    po, co = _offsets(prefix_offsets), _offsets(cand_offsets)
    dout, q, k, v, prefix_k, prefix_v, out, lse = (
        x.contiguous() for x in (dout, q, k, v, prefix_k, prefix_v, out, lse))
    c, n, h, d = q.shape
    grads = [torch.empty_like(x) for x in (q, k, v, prefix_k, prefix_v)]
    _check(library().recsys_prefix_bwd(*_ptrs(dout, q, k, v, prefix_k, prefix_v, out, lse, po, co), po.numel() - 1,
                                       n, h, d, scale, *_ptrs(*grads), torch.get_num_threads()))
    return tuple(grads)


def rotary_supported(x: torch.Tensor) -> bool:
    """True when :func:`rotary_parts` takes ``x``: CPU fp32 with an even head size, library available."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[-1] % 2 == 0 and library() is not None


def _rotary(src: list[int | None], src_row: int, dst: list[int], dst_row: int, cos: torch.Tensor, sin: torch.Tensor,
            h: int, d: int, n_rot: int, sign: float) -> None:
    """One ``recsys_rotary`` call: part p read at ``src[p]`` (``None``: zeros), written at ``dst[p]``, rows
    ``src_row`` / ``dst_row`` floats apart; ``cos, sin [M, D/2]`` contiguous."""
    p = len(src)
    _check(library().recsys_rotary((ctypes.c_void_p * p)(*src), src_row, (ctypes.c_void_p * p)(*dst), dst_row,
                                   cos.data_ptr(), sin.data_ptr(), cos.numel() // (d // 2), p, h, d, n_rot, sign,
                                   torch.get_num_threads()))


def rotary_parts(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rot: int) -> list[torch.Tensor]:
    """``x [..., P, H, D]``, ``cos, sin [..., D/2]`` (the same leading shape) -> P contiguous ``[..., H, D]``: the
    first ``n_rot`` rotated (rotate-half form) by the angles, the others copied."""
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    p, h, d = x.shape[-3:]
    outs = [torch.empty(*x.shape[:-3], h, d, dtype=x.dtype) for _ in range(p)]
    part = h * d * x.element_size()
    _rotary([x.data_ptr() + i * part for i in range(p)], p * h * d, [o.data_ptr() for o in outs], h * d, cos, sin,
            h, d, n_rot, 1.0)
    return outs


def unrotary_parts(grads: list[torch.Tensor | None], cos: torch.Tensor, sin: torch.Tensor, n_rot: int
                   ) -> torch.Tensor:
    """Backward of :func:`rotary_parts` (the rotation by the opposite angle): P gradients ``[..., H, D]``
    (``None`` = zeros) -> ``[..., P, H, D]``."""
    ref = next(g for g in grads if g is not None)
    grads = [None if g is None else g.contiguous() for g in grads]
    p, (h, d) = len(grads), ref.shape[-2:]
    gx = torch.empty(*ref.shape[:-2], p, h, d, dtype=ref.dtype)
    part = h * d * gx.element_size()
    _rotary([None if g is None else g.data_ptr() for g in grads], h * d, [gx.data_ptr() + i * part for i in range(p)],
            p * h * d, cos.contiguous(), sin.contiguous(), h, d, n_rot, -1.0)
    return gx
