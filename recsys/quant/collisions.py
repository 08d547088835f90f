"""Collision handling: make every item's semantic-ID tuple unique.

1. Optional last-level re-balancing (:func:`rebalance_last_level`): inside every prefix
   ``(c_1..c_{M-1})`` that holds a collision, the last codes are re-assigned so that no two items
   share one, each item as close to its content as the others allow (greedy by ascending cost).
   The ID keeps M columns that the ranker embeds, so colliding items stop sharing an embedding.
2. One extra level (:func:`resolve_collisions`), always: items still sharing a tuple (a prefix with
   more than K items, or no re-balancing) get a disambiguation code ``0, 1, 2, ...`` in increasing
   item order. Example: codes ``[[3,1],[3,1],[0,2]]`` -> ``[[3,1,0],[3,1,1],[0,2,0]]``.

Both depend only on the codes, the costs and the item order: deterministic for a seed.
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


def rebalance_last_level(codes: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """``codes [N, M]``, ``costs [N, K]`` (cost of each last-level code for each item) -> ``[N, M]``
    with the last column re-assigned inside every prefix group that holds a collision.

    Per such group of g items: (item, code) pairs in ascending cost (ties: item order, then code);
    a pair is taken when neither its item nor its code is taken yet, until min(g, K) items have a
    code; items left over (g > K) keep their code and rely on the extra level. Groups without a
    collision are unchanged. Written by hand: it is a greedy assignment per group, which no
    library in the stack offers (scipy's Hungarian solver would be exact but is not a dependency).
    """
    if codes.ndim != 2 or costs.ndim != 2 or costs.shape[0] != codes.shape[0]:
        raise ValueError(f"codes [N, M] and costs [N, K] must share N, got {tuple(codes.shape)}, {tuple(costs.shape)}")
    out = codes.clone()
    n, m = codes.shape
    if n == 0 or m == 0:
        return out
    k = costs.shape[1]
    if int(codes[:, -1].max()) >= k:
        raise ValueError(f"last-level codes go up to {int(codes[:, -1].max())}, but costs has only {k} columns")
    _, full_inv, full_counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    colliding = full_counts[full_inv] > 1
    if not colliding.any():
        return out
    if m == 1:
        prefix_inv = torch.zeros(n, dtype=torch.int64)
    else:
        _, prefix_inv = torch.unique(codes[:, :-1], dim=0, return_inverse=True)
    order = torch.argsort(prefix_inv, stable=True)  # items grouped by prefix, increasing index inside
    sorted_inv = prefix_inv[order]
    groups = torch.unique(prefix_inv[colliding])
    starts = torch.searchsorted(sorted_inv, groups).tolist()
    ends = torch.searchsorted(sorted_inv, groups, right=True).tolist()
    for s, e in zip(starts, ends):
        items = order[s:e]
        pairs = torch.argsort(costs[items].flatten(), stable=True).tolist()
        item_done, code_used = [False] * len(items), [False] * k
        left = min(len(items), k)
        for p in pairs:
            i, c = divmod(p, k)
            if item_done[i] or code_used[c]:
                continue
            item_done[i] = code_used[c] = True
            out[items[i], -1] = c
            left -= 1
            if left == 0:
                break
    return out


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
