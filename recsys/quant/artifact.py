"""``SemanticIds``: the item -> SID table plus what is needed to give a new item a SID.

Stored as a plain dict of tensors / ints / strings (``to_dict``), so it rides inside a training
checkpoint and loads with ``torch.load(weights_only=True)``. Layout::

    codes        [I, M+1] int64   row = item id; M semantic columns + 1 disambiguation column;
                                  -1 on every column of an item without a content vector (e.g. id 0)
    cardinality  [M] int64        codes per semantic column
    center [d], scale []          content preprocessing: (x - center) / scale
    quantizer    dict             the fitted quantizer's state (method name + tensors)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recsys.quant.collisions import next_free_suffix
from recsys.quant.multi_expert import MultiExpertQuantizer
from recsys.quant.rq_kmeans import RQKMeans
from recsys.quant.rq_vae import RQVAE
from recsys.reliability.atomic import atomic_write
from recsys.reliability.checkpoint import load_checkpoint

QUANTIZERS = {"rq_kmeans": RQKMeans, "rq_vae": RQVAE, "multi_expert": MultiExpertQuantizer}


def quantizer_from_state(state: dict[str, Any]) -> RQKMeans | RQVAE | MultiExpertQuantizer:
    method = state.get("method")
    if method not in QUANTIZERS:
        raise ValueError(f"unknown quantizer method {method!r}; expected one of {sorted(QUANTIZERS)}")
    return QUANTIZERS[method].from_state(state)


@dataclass
class SemanticIds:
    codes: torch.Tensor
    cardinality: torch.Tensor
    center: torch.Tensor
    scale: torch.Tensor
    quantizer: dict[str, Any]

    @property
    def num_columns(self) -> int:
        """M: semantic code columns (the disambiguation column excluded)."""
        return int(self.cardinality.numel())

    def to_dict(self) -> dict[str, Any]:
        return {"codes": self.codes, "cardinality": self.cardinality, "center": self.center, "scale": self.scale,
                "quantizer": self.quantizer}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SemanticIds:
        missing = {"codes", "cardinality", "center", "scale", "quantizer"} - set(d)
        if missing:
            raise ValueError(f"semantic-id dict lacks {sorted(missing)}")
        return cls(d["codes"].long(), d["cardinality"].long(), d["center"].float(), d["scale"].float(), d["quantizer"])

    def save(self, path: str | Path) -> None:
        """Crash-safe: ``path`` holds the old artifact or the complete new one."""
        atomic_write(path, lambda f: torch.save(self.to_dict(), f))

    @classmethod
    def load(cls, path: str | Path) -> SemanticIds:
        """Loaded like every checkpoint (``load_checkpoint``: ``weights_only``, a damaged or foreign file is a
        ``CheckpointError`` naming it)."""
        return cls.from_dict(load_checkpoint(path))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.center) / self.scale

    def with_new_items(self, item_ids: torch.Tensor, vectors: torch.Tensor) -> SemanticIds:
        """SIDs for items that have none yet (``item_ids [n]``, ``vectors [n, d]``): encoded with the
        stored quantizer, made unique with the next free disambiguation code. Items that already
        have a SID keep it; the table grows if an id is beyond it."""
        if vectors.ndim != 2 or vectors.shape[0] != item_ids.numel() or vectors.shape[1] != self.center.numel():
            raise ValueError(f"vectors must be [{item_ids.numel()}, {self.center.numel()}], "
                             f"got {tuple(vectors.shape)}")
        size = max(self.codes.shape[0], int(item_ids.max()) + 1 if item_ids.numel() else 0)
        codes = torch.full((size, self.codes.shape[1]), -1, dtype=torch.int64)
        codes[: self.codes.shape[0]] = self.codes
        new = item_ids[codes[item_ids, 0] < 0]
        if new.numel():
            q = quantizer_from_state(self.quantizer)
            sem = q.encode(self.preprocess(vectors[codes[item_ids, 0] < 0]))
            known = codes[codes[:, 0] >= 0]
            codes[new] = torch.cat([sem, next_free_suffix(known, sem)[:, None]], 1)
        return SemanticIds(codes, self.cardinality, self.center, self.scale, self.quantizer)
