"""Attention kernels: PyTorch references, CPU fast paths, Triton kernels, dispatch.

Public API::

    from kernels import jagged_causal_attention, candidate_prefix_attention, AttentionBackend

Per op: ``kernels/<op>.py`` (public function + dispatch), ``kernels/reference.py`` (oracle),
``kernels/torch_attention.py`` (CPU fast path), ``kernels/triton_<op>.py`` (Triton kernels,
imported lazily on the first ``backend="triton"`` call), ``kernels/custom_ops.py``
(``torch.library`` registration, namespace ``recsys``).
"""

from kernels.backend import AttentionBackend
from kernels.candidate_prefix_attention import candidate_prefix_attention
from kernels.jagged_causal_attention import jagged_causal_attention

__all__ = ["AttentionBackend", "candidate_prefix_attention", "jagged_causal_attention"]
