"""`RequestBatch`: what the loader yields and the ranker consumes.

Shape legend: ``B`` requests in the batch, ``L_b`` history length of request b for a
sequence kind, ``C_b`` candidates of request b, ``T`` tasks.

Example, one sequence kind ``click``, B=2: request 0 has history items [7, 3] and
candidates [11, 12, 13]; request 1 has an empty history and candidate [5]::

    seq["click.item_id"].values()   = [7, 3]        lengths = [2, 0]   offsets = [0, 2, 2]
    seq_ts["click"].values()        = [100, 160]    (same lengths)
    cand["item_id"].values()        = [11, 12, 13, 5]  lengths = [3, 1]
    cand_offsets                    = [0, 3, 4]
    labels                          = [[1.], [0.], [0.], [1.]]   # [sum C_b, T]
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class RequestBatch:
    request_id: torch.Tensor
    """[B] int64."""
    user_id: torch.Tensor
    """[B] int64."""
    request_ts: torch.Tensor
    """[B] int64, seconds."""
    sparse: KeyedJaggedTensor
    """User/context sparse features; keys = schema sparse names, one id per request (lengths all 1)."""
    dense: torch.Tensor
    """[B, n_dense] float32 (n_dense may be 0)."""
    seq: KeyedJaggedTensor
    """Behaviour id features; keys ``"<kind>.item_id"``, ``"<kind>.category"``, ``"<kind>.action"``
    for each kind; lengths [B] per key = history length after truncation (oldest first)."""
    seq_ts: KeyedJaggedTensor
    """Event timestamps; keys = kinds; same lengths as ``seq``'s keys of that kind. int64 seconds."""
    cand: KeyedJaggedTensor
    """Candidate id features; keys ``"item_id"``, ``"category"``; lengths [B] = C_b (>= 1)."""
    cand_offsets: torch.Tensor
    """[B+1] int64: candidates of request b are rows cand_offsets[b]:cand_offsets[b+1]."""
    labels: torch.Tensor
    """[sum C_b, T] float32 in {0, 1}."""
    true_prob: torch.Tensor | None = None
    """[sum C_b, T] float32, planted probabilities (synthetic data only)."""
    long_seq: KeyedJaggedTensor | None = None
    """Long history (``loader.long_max_len > 0`` only; see ``recsys.longseq``): keys ``"item_id"``,
    ``"category"``, ``"action"``, ``"ts"``, ``"kind"`` (index into the schema's kinds) and
    ``"in_window"`` (1 if the event is also an S token in ``seq``); lengths [B] per key. Per request,
    each kind's last ``long_max_len`` events, kind-major (schema order), oldest first inside a kind."""

    @property
    def num_requests(self) -> int:
        return int(self.request_id.numel())

    @property
    def num_candidates(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RequestBatch:
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = None if v is None else v.to(device, non_blocking=non_blocking)
        return replace(self, **moved)

    def pin_memory(self) -> RequestBatch:
        pinned = {}
        for f in fields(self):
            v = getattr(self, f.name)
            pinned[f.name] = None if v is None else v.pin_memory()
        return replace(self, **pinned)
