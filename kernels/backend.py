"""Backend selection shared by every attention op in this package.

One enum, one resolver. Nothing here falls back silently: an unknown name raises
``ValueError``; asking for Triton on CPU tensors without the Triton interpreter
raises ``RuntimeError``.
"""

from __future__ import annotations

import os
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: config modules import this enum without paying for torch
    import torch


class AttentionBackend(str, Enum):
    """Which implementation an attention op runs.

    - ``reference``: plain masked softmax in fp32 with Python loops over sequences (the oracle).
    - ``torch``: CPU fast path (padded SDPA / chunked batched matmuls), exact same math.
    - ``triton``: flash-style Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``).
    - ``auto``: ``triton`` when the inputs are on CUDA, ``torch`` otherwise.
    """

    REFERENCE = "reference"
    TORCH = "torch"
    TRITON = "triton"
    AUTO = "auto"


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set (Triton reads it when ``triton.jit`` decorates)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str | AttentionBackend, *tensors: torch.Tensor) -> AttentionBackend:
    """Turn a user-facing backend name into a concrete backend for these tensors.

    Raises:
        ValueError: ``backend`` is not one of the ``AttentionBackend`` values.
        RuntimeError: ``triton`` was asked for CPU tensors while the Triton interpreter is off.
    """
    try:
        chosen = AttentionBackend(backend)
    except ValueError:
        valid = ", ".join(repr(b.value) for b in AttentionBackend)
        raise ValueError(f"unknown attention backend {backend!r}; valid backends: {valid}") from None
    on_cuda = all(t.is_cuda for t in tensors)
    if chosen is AttentionBackend.AUTO:
        return AttentionBackend.TRITON if on_cuda else AttentionBackend.TORCH
    if chosen is AttentionBackend.TRITON and not on_cuda and not triton_interpreter_enabled():
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"backend='triton' got tensors on {devices}: Triton kernels run on CUDA only, or on CPU "
            "under the Triton interpreter (set TRITON_INTERPRET=1 before triton is imported). "
            "Use backend='torch' for the CPU fast path."
        )
    return chosen
