"""Collision handling: make every item's semantic-ID tuple unique with one extra level.

Items sharing a tuple ``(c_1..c_M)`` get a disambiguation code ``0, 1, 2, ...`` in increasing
item order (so the result depends only on the codes and the item order: deterministic for a
seed). Example: codes ``[[3,1],[3,1],[0,2]]`` -> ``[[3,1,0],[3,1,1],[0,2,0]]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CollisionStats:
    collision_rate: float
    """Share of items whose tuple (before the fix) is shared with at least one other item."""
    unique_tuples: int
    """Distinct tuples before the fix."""
    max_items_per_tuple: int
    """Largest group sharing one tuple (= cardinality of the extra level)."""


def resolve_collisions(codes: torch.Tensor) -> tuple[torch.Tensor, CollisionStats]:
    """``codes [N, M]`` -> ``[N, M+1]`` with unique rows, plus the pre-fix statistics."""
    if codes.ndim != 2:
        raise ValueError(f"codes must be [N, M], got shape {tuple(codes.shape)}")
    n = codes.shape[0]
    if n == 0:
        return codes.new_zeros(0, codes.shape[1] + 1), CollisionStats(0.0, 0, 0)
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)  # items grouped by tuple, increasing item index inside
    group_start = torch.cumsum(counts, 0) - counts  # [G]
    rank = torch.empty(n, dtype=torch.int64)
    rank[order] = torch.arange(n) - group_start[inverse[order]]
    stats = CollisionStats(collision_rate=float((counts[inverse] > 1).float().mean()),
                           unique_tuples=int(counts.numel()), max_items_per_tuple=int(counts.max()))
    return torch.cat([codes, rank[:, None]], 1), stats


def next_free_suffix(fixed: torch.Tensor, new_codes: torch.Tensor) -> torch.Tensor:
    """Disambiguation codes for new items ``new_codes [n, M]`` given existing unique ``fixed [N, M+1]``:
    each new item takes the smallest suffix not yet used by its tuple (new items in order)."""
    taken: dict[tuple[int, ...], set[int]] = {}
    for row in fixed.tolist():
        taken.setdefault(tuple(row[:-1]), set()).add(row[-1])
    out = []
    for row in new_codes.tolist():
        used = taken.setdefault(tuple(row), set())
        s = 0
        while s in used:
            s += 1
        used.add(s)
        out.append(s)
    return torch.tensor(out, dtype=torch.int64)
