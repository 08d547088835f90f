"""k-means on torch tensors: k-means++ seeding, Lloyd iterations, optional balanced assignment.

Hand-written (about 80 lines) because the environment has no scikit-learn / faiss and the
quantizers need it on torch tensors with a seeded ``torch.Generator`` (same seed -> same codes).

Shapes: ``x [N, d]`` points, ``centroids [K, d]``, ``assign [N]`` int64 in ``0..K-1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

_CHUNK = 16384  # rows per distance block: bounds the [chunk, K] temporary


def sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` squared Euclidean distances (clamped at 0 against cancellation)."""
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)[None]).clamp_min_(0)


def nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``[N]`` index of the nearest centroid (ties -> lowest index), computed in row blocks."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=x.device)
    return torch.cat([sq_dist(x[i:i + _CHUNK], c).argmin(1) for i in range(0, x.shape[0], _CHUNK)])


def kmeans_pp_init(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): ``[k, d]`` centroids drawn from ``x``.

    With fewer distinct points than ``k`` the remaining centroids repeat points (D^2 = 0
    everywhere): the caller's utilisation report then shows the unused codes.
    """
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    cents = [x[first]]
    d2 = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial(d2 / total, 1, generator=gen))
        cents.append(x[idx])
        d2 = torch.minimum(d2, (x - x[idx]).pow(2).sum(1))
    return torch.stack(cents)


def balanced_assign(x: torch.Tensor, c: torch.Tensor, capacity: int) -> torch.Tensor:
    """Capacity-constrained assignment: every code takes at most ``capacity`` points.

    Greedy over (point, code) pairs in increasing distance among each point's ``m`` nearest
    codes; the few points left over (all their m codes full) take their nearest code with room.
    Deterministic (stable sorts). ``capacity * K >= N`` is required.
    """
    n, k = x.shape[0], c.shape[0]
    if capacity * k < n:
        raise ValueError(f"balanced assignment: capacity {capacity} x {k} codes < {n} points")
    m = min(k, 32)
    d = torch.cat([sq_dist(x[i:i + _CHUNK], c) for i in range(0, n, _CHUNK)]) if n else x.new_zeros(0, k)
    dist, code = d.topk(m, dim=1, largest=False)  # [N, m]
    order = torch.argsort(dist.flatten(), stable=True)
    pts = (order // m).tolist()
    codes = code.flatten()[order].tolist()
    out = [-1] * n
    load = [0] * k
    for p, q in zip(pts, codes):  # pure-python greedy: O(N m); fine for catalogs up to ~1e6 pairs
        if out[p] < 0 and load[q] < capacity:
            out[p] = q
            load[q] += 1
    for p in (i for i, a in enumerate(out) if a < 0):
        row = d[p].clone()
        row[torch.tensor(load) >= capacity] = float("inf")
        q = int(row.argmin())
        out[p] = q
        load[q] += 1
    return torch.tensor(out, dtype=torch.int64)


@dataclass
class KMeansResult:
    centroids: torch.Tensor
    """[K, d]"""
    assign: torch.Tensor
    """[N] int64"""


def kmeans(x: torch.Tensor, k: int, gen: torch.Generator, iters: int = 25, balanced: bool = False,
           on_iter: Callable[[], object] | None = None) -> KMeansResult:
    """Lloyd's k-means from a k-means++ start; ``balanced`` caps every cluster at ``ceil(N / K)`` points.

    An empty cluster is re-seeded with the point farthest from its centroid. ``on_iter`` is called after
    every Lloyd iteration (a progress bar's ``update``).
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty [N, d] tensor, got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"kmeans needs k >= 1, got {k}")
    x = x.float()
    c = kmeans_pp_init(x, k, gen)
    cap = -(-x.shape[0] // k)
    assign = nearest(x, c)
    for _ in range(iters):
        assign = balanced_assign(x, c, cap) if balanced else nearest(x, c)
        counts = torch.bincount(assign, minlength=k)
        new_c = torch.zeros_like(c).index_add_(0, assign, x) / counts.clamp_min(1)[:, None].float()
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            far = (x - new_c[assign]).pow(2).sum(1).argsort(descending=True)[: len(empty)]
            new_c[empty[: len(far)]] = x[far]
        moved = (new_c - c).abs().max().item() if c.numel() else 0.0
        c = new_c
        if on_iter is not None:
            on_iter()
        if moved < 1e-7 and not len(empty):
            break
    assign = balanced_assign(x, c, cap) if balanced else nearest(x, c)
    return KMeansResult(c, assign)
