"""Attention kernels: PyTorch references, CPU fast paths, Triton kernels, dispatch.

Public API::

    from kernels import jagged_causal_attention, candidate_prefix_attention, AttentionBackend

Per op: ``kernels/<op>.py`` (public function + dispatch), ``kernels/reference.py`` (oracle),
``kernels/torch_attention.py`` (CPU fast path), ``kernels/triton_<op>.py`` (Triton kernels,
imported lazily on the first ``backend="triton"`` call), ``kernels/custom_ops.py``
(``torch.library`` registration, namespace ``recsys``).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

# Submodule of every public name, imported on first access (PEP 562): a config module that only
# needs the ``AttentionBackend`` enum (``kernels.backend``, torch-free) must not import torch and
# register the custom ops, so an entry point refuses a bad config before paying for torch.
_EXPORTS = {
    "AttentionBackend": "backend",
    "candidate_prefix_attention": "candidate_prefix_attention",
    "jagged_causal_attention": "jagged_causal_attention",
}

if TYPE_CHECKING:  # static analysers see the eager imports
    from kernels.backend import AttentionBackend
    from kernels.candidate_prefix_attention import candidate_prefix_attention
    from kernels.jagged_causal_attention import jagged_causal_attention


class _KernelsPackage(types.ModuleType):
    """Keeps ``kernels.<op>`` the public function: importing the submodule of the same name
    (``from kernels.jagged_causal_attention import ...``) makes the import system bind the
    submodule on the package; bind the function instead, as the eager imports did."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and name in _EXPORTS and _EXPORTS[name] == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _KernelsPackage


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


__all__ = ["AttentionBackend", "candidate_prefix_attention", "jagged_causal_attention"]
