"""Item-vector index for embedding retrieval: top-k inner product over the catalog, on faiss.

Shapes: ``B`` requests, ``D`` vector width, ``N`` indexed items, ``k`` results per request.

* ``flat`` (default): ``faiss.IndexFlatIP``, exact; equals ``torch.topk(U @ I.T)`` (pinned by a test).
* ``ivf``: ``faiss.IndexIVFFlat`` (``nlist`` k-means cells, ``nprobe`` visited per query), approximate.
* ``hnsw``: ``faiss.IndexHNSWFlat`` (``hnsw_m`` links per node, ``ef_search`` beam at query time), approximate.

Recall of ``ivf`` / ``hnsw`` against ``flat`` is measured in ``bench/retrieval_ann.py``, never asserted.

Item ids: faiss numbers its rows 0..N-1; ``ItemIndex`` keeps the item id of every row and maps results
back. Item 0 is the padding id and is never indexed.

Exclusion (e.g. the request's own history): a jagged ``exclude_values [sum L_b]`` + ``exclude_offsets
[B+1]``. faiss is asked for ``k + max_b L_b`` rows (capped at ``N``), the excluded ids are dropped and the
first ``k`` survivors kept, so a request loses no result to exclusion. Where fewer than ``k`` survive (an
ANN index whose visited cells hold too few items, or a request excluding almost the whole catalog), the
missing tail is ``item id -1`` with score ``-inf``; the exact index always fills ``k`` while
``k <= N - |excluded items of the request|``. One ``max L_b`` for the whole batch: one faiss call; a batch
with one very long history over-fetches for every request (split such batches upstream if that matters).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from recsys.errors import InputError

PADDING_ITEM = 0


class IndexKind(str, enum.Enum):
    FLAT = "flat"
    IVF = "ivf"
    HNSW = "hnsw"


@dataclass
class IndexConfig:
    kind: IndexKind = IndexKind.FLAT
    """flat = exact inner product; ivf / hnsw = approximate (recall measured in bench/retrieval_ann.py)."""
    nlist: int = 256
    """ivf: number of k-means cells (at most the number of items)."""
    nprobe: int = 16
    """ivf: cells visited per query (recall/speed knob)."""
    hnsw_m: int = 32
    """hnsw: graph links per node."""
    ef_construction: int = 64
    """hnsw: candidate list size while building."""
    ef_search: int = 64
    """hnsw: candidate list size at query time (recall/speed knob; recall@k drops once k nears it)."""
    seed: int = 0
    """ivf: k-means seed, so two builds on the same vectors give the same index."""

    def __post_init__(self) -> None:
        self.kind = IndexKind(self.kind)
        for name in ("nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise InputError(f"index config: {name} must be >= 1, got {getattr(self, name)}")


def _check_vectors(x: torch.Tensor, what: str) -> None:
    if x.ndim != 2:
        raise InputError(f"{what} must be [rows, D], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(1).nonzero()[0, 0])
        raise InputError(f"{what} row {bad} has a NaN or infinite value; fix the vectors before indexing/searching")


def _build_faiss(vecs: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    n, d = vecs.shape
    if cfg.kind is IndexKind.FLAT:
        index = faiss.IndexFlatIP(d)
    elif cfg.kind is IndexKind.IVF:
        if cfg.nlist > n:
            raise InputError(f"index config: nlist={cfg.nlist} exceeds the {n} indexed items; lower nlist")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, cfg.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = cfg.seed
        index.train(vecs)
        index.nprobe = min(cfg.nprobe, cfg.nlist)
    elif cfg.kind is IndexKind.HNSW:
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
    else:  # an enum value added without a branch here must fail, not fall back
        raise InputError(f"unknown index kind {cfg.kind!r}")
    index.add(vecs)
    return index


class ItemIndex:
    """Top-k inner-product search over item vectors.

    ``item_vecs [N, D]`` float; ``item_ids [N]`` int64 (default ``arange(N)``: the rows of an item
    embedding table, row = item id). Rows whose id is 0 (padding) are left out.
    """

    def __init__(self, item_vecs: torch.Tensor, item_ids: torch.Tensor | None = None,
                 config: IndexConfig | None = None) -> None:
        self.config = config or IndexConfig()
        _check_vectors(item_vecs, "item vectors")
        ids = torch.arange(item_vecs.shape[0]) if item_ids is None else item_ids.long().reshape(-1)
        if ids.numel() != item_vecs.shape[0]:
            raise InputError(f"item_ids has {ids.numel()} entries for {item_vecs.shape[0]} item vectors")
        if ids.unique().numel() != ids.numel():
            raise InputError("item_ids holds a duplicate id; each item must be indexed once")
        keep = ids != PADDING_ITEM
        self.item_ids = ids[keep]  # [N] item id of every faiss row
        if self.item_ids.numel() == 0:
            raise InputError("item index is empty: no item vector besides the padding id 0")
        self.dim = int(item_vecs.shape[1])
        vecs = np.ascontiguousarray(item_vecs.detach()[keep].float().cpu().numpy())
        self.index = _build_faiss(vecs, self.config)

    def __len__(self) -> int:
        return int(self.item_ids.numel())

    def search(self, user_vecs: torch.Tensor, k: int, exclude_values: torch.Tensor | None = None,
               exclude_offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``user_vecs [B, D]`` -> (``scores [B, k]`` float32 descending, ``item_ids [B, k]`` int64).

        ``exclude_values [sum L_b]`` / ``exclude_offsets [B+1]``: item ids request ``b`` must not get.
        Missing results (see the module docstring) are id -1, score -inf.
        """
        _check_vectors(user_vecs, "user vectors")
        b = user_vecs.shape[0]
        if user_vecs.shape[1] != self.dim:
            raise InputError(f"user vectors are {user_vecs.shape[1]}-wide, the item index holds {self.dim}-wide "
                             "vectors; encode users and items with the same model")
        if not 1 <= k <= len(self):
            raise InputError(f"k={k} must be in [1, {len(self)}] (the number of indexed items)")
        excl_len = self._exclusion_lengths(b, exclude_values, exclude_offsets)
        fetch = min(len(self), k + (int(excl_len.max()) if b and excl_len.numel() else 0))
        query = np.ascontiguousarray(user_vecs.detach().float().cpu().numpy())
        scores, rows = (torch.from_numpy(a) for a in self.index.search(query, fetch))  # [B, fetch]
        ids = torch.where(rows >= 0, self.item_ids[rows.clamp(min=0)], -1)
        drop = rows < 0
        if exclude_values is not None and exclude_values.numel():
            drop |= self._excluded(ids, exclude_values, excl_len)
        # faiss returns rows best first; a stable sort on the drop flag keeps that order among survivors.
        order = torch.sort(drop.to(torch.int8), dim=1, stable=True).indices[:, :k]  # [B, k]
        lost = drop.gather(1, order)
        scores = scores.gather(1, order).masked_fill(lost, float("-inf"))
        ids = ids.gather(1, order).masked_fill(lost, -1)
        return scores, ids

    @staticmethod
    def _exclusion_lengths(b: int, values: torch.Tensor | None, offsets: torch.Tensor | None) -> torch.Tensor:
        if values is None and offsets is None:
            return torch.zeros(b, dtype=torch.int64)
        if values is None or offsets is None:
            raise InputError("exclusion needs both exclude_values and exclude_offsets")
        if offsets.ndim != 1 or offsets.numel() != b + 1 or int(offsets[0]) != 0 \
                or int(offsets[-1]) != values.numel() or bool((offsets[1:] < offsets[:-1]).any()):
            raise InputError(f"exclude_offsets must be [B+1]={b + 1} non-decreasing from 0 to "
                             f"len(exclude_values)={values.numel()}, got {offsets.tolist()[:8]}...")
        return (offsets[1:] - offsets[:-1]).long()

    @staticmethod
    def _excluded(ids: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``ids [B, F]`` -> bool ``[B, F]``: is ``ids[b, j]`` among request ``b``'s excluded ids.
        One key per (request, id) so a single ``isin`` tests every request against its own set."""
        span = int(max(int(ids.max()), int(values.max()))) + 2  # ids >= -1, shifted by 1 to be >= 0
        req = torch.arange(ids.shape[0]).unsqueeze(1)
        keys = req * span + (ids + 1)  # [B, F]
        excl = torch.repeat_interleave(torch.arange(lengths.numel()), lengths) * span + (values.long() + 1)
        return torch.isin(keys, excl)
