"""Prefix trie of the catalog's semantic IDs: which next codes are valid after a prefix.

Input: ``codes [I, L]`` int64, row = item id, as ``recsys.quant`` writes them (``SemanticIds.codes``:
``M`` semantic columns + 1 disambiguation column, so ``L = M + 1``; every column ``-1`` for an item
without a SID, such as the padding id 0; those rows are skipped). Every full SID must be unique (the
artifact makes them so); a duplicate is refused since it could not name one item.

Layout: level-wise CSR over the lexicographically sorted SIDs. Level ``t`` (``0..L``) has ``P_t``
nodes, the distinct prefixes of length ``t`` in sorted order (level 0: the root; level ``L``: the
items, so ``P_L = N``). For the nodes of level ``t``::

    child_start[t]  [P_t + 1]   children of node p are nodes child_start[t][p] : child_start[t][p+1] of level t+1
    child_code[t]   [P_{t+1}]   the code that leads to each child (sorted within a parent)
    child_key[t]    [P_{t+1}]   parent * V + code, ascending: a child is found by binary search (searchsorted)
    leaf_item       [N]         item id of each level-L node

Example, SIDs of items 5, 3, 9 = (0, 1), (0, 2), (1, 0), ``V = 3``: level 1 nodes (0), (1);
``child_start[0] = [0, 2]``, ``child_code[0] = [0, 1]``; ``child_start[1] = [0, 2, 3]``,
``child_code[1] = [1, 2, 0]``, ``child_key[1] = [1, 2, 3]``; ``leaf_item = [5, 3, 9]``.

Why CSR + binary search rather than dense ``[P_t, V]`` masks built once per level: dense masks cost
``sum_t P_t * V`` (1M items x 256 codes is 256 MB of bool per level, 4x that as child-index tables),
the CSR ``O(N * L)`` int64 in all. The dense mask the beam search needs is built per step only for the
live beams, ``[beams, V]``, from their children ranges (``O(beams * V + their children)``).
"""

from __future__ import annotations

import torch

from recsys.data.jagged import lengths_to_offsets, positions_in_sequence
from recsys.errors import InputError


def lexsort_rows(codes: torch.Tensor) -> torch.Tensor:
    """``codes [N, L]`` -> permutation ``[N]`` sorting the rows lexicographically (column 0 first).
    torch has no lexsort: stable sorts from the last column to the first."""
    order = torch.arange(codes.shape[0])
    for col in reversed(range(codes.shape[1])):
        order = order[torch.sort(codes[order, col], stable=True).indices]
    return order


class SidTrie:
    """Trie of ``codes [I, L]`` (see the module docstring); ``item_ids [I]`` defaults to the row index."""

    def __init__(self, codes: torch.Tensor, item_ids: torch.Tensor | None = None,
                 vocab_size: int | None = None) -> None:
        if codes.ndim != 2 or codes.shape[1] < 1:
            raise InputError(f"semantic-id codes must be [items, L >= 1], got shape {tuple(codes.shape)}")
        codes = codes.long()
        ids = torch.arange(codes.shape[0]) if item_ids is None else item_ids.long().reshape(-1)
        if ids.numel() != codes.shape[0]:
            raise InputError(f"item_ids has {ids.numel()} entries for {codes.shape[0]} SID rows")
        missing = codes < 0
        partial = missing.any(1) & ~missing.all(1)
        if partial.any():
            row = int(partial.nonzero()[0, 0])
            raise InputError(f"semantic-id row {row} (item {int(ids[row])}) mixes -1 and codes: {codes[row].tolist()}")
        codes, ids = codes[~missing.any(1)], ids[~missing.any(1)]
        if codes.shape[0] == 0:
            raise InputError("semantic-id trie is empty: no item has a SID")
        self.depth = int(codes.shape[1])
        need = int(codes.max()) + 1
        self.vocab_size = need if vocab_size is None else int(vocab_size)
        if self.vocab_size < need:
            raise InputError(f"vocab_size={vocab_size} is below the largest code + 1 = {need}")
        order = lexsort_rows(codes)
        self.sorted_codes = codes[order]  # [N, L]
        self.leaf_item = ids[order]  # [N]
        self._build_levels()

    def _build_levels(self) -> None:
        sc, n = self.sorted_codes, self.sorted_codes.shape[0]
        node_of_row = torch.zeros(n, dtype=torch.int64)  # level-0 node (the root) of every row
        self.num_nodes = [1]
        self.child_start, self.child_code, self.child_key = [], [], []
        for t in range(self.depth):
            new = torch.ones(n, dtype=torch.bool)
            new[1:] = (sc[1:, : t + 1] != sc[:-1, : t + 1]).any(1)  # first row of each length-(t+1) prefix
            first = new.nonzero().squeeze(1)  # [P_{t+1}]
            parent = node_of_row[first]
            code = sc[first, t]
            self.child_code.append(code)
            self.child_key.append(parent * self.vocab_size + code)
            self.child_start.append(torch.searchsorted(parent, torch.arange(self.num_nodes[t] + 1)))
            node_of_row = torch.cumsum(new.long(), 0) - 1
            self.num_nodes.append(int(first.numel()))
        if self.num_nodes[-1] != n:
            dup = ((sc[1:] == sc[:-1]).all(1)).nonzero()[0, 0]
            raise InputError(f"items {int(self.leaf_item[dup])} and {int(self.leaf_item[dup + 1])} share the SID "
                             f"{sc[dup].tolist()}; resolve collisions (recsys.quant collision_fix) first")

    def __len__(self) -> int:
        return int(self.leaf_item.numel())

    def next_code_mask(self, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """``nodes [R]`` of level ``level`` (``0..L-1``) -> bool ``[R, V]``: codes that extend them to a
        real prefix. Node ``-1`` (no prefix) gets an all-False row."""
        ok = nodes >= 0
        safe = nodes.clamp(min=0)
        start = self.child_start[level][safe]
        counts = torch.where(ok, self.child_start[level][safe + 1] - start, 0)  # [R]
        offsets = lengths_to_offsets(counts)
        rows = torch.repeat_interleave(torch.arange(nodes.numel()), counts)  # [sum children]
        children = torch.repeat_interleave(start, counts) + positions_in_sequence(offsets)
        mask = torch.zeros(nodes.numel(), self.vocab_size, dtype=torch.bool)
        mask[rows, self.child_code[level][children]] = True
        return mask

    def child(self, level: int, nodes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``nodes [R]`` of level ``level``, ``codes [R]`` -> their children, nodes of level ``level+1``,
        or -1 where ``(node, code)`` is not a prefix of any item (binary search over ``child_key``)."""
        keys = self.child_key[level]
        ok = (nodes >= 0) & (codes >= 0) & (codes < self.vocab_size)
        want = nodes * self.vocab_size + codes
        pos = torch.searchsorted(keys, want).clamp(max=keys.numel() - 1)
        return torch.where(ok & (keys[pos] == want), pos, -1)

    def node_of_prefix(self, prefix_codes: torch.Tensor) -> torch.Tensor:
        """``prefix_codes [R, t]`` -> node ``[R]`` of level ``t`` for each prefix, -1 if no item starts so."""
        if prefix_codes.ndim != 2 or prefix_codes.shape[1] > self.depth:
            raise InputError(f"prefixes must be [R, t <= {self.depth}], got {tuple(prefix_codes.shape)}")
        nodes = torch.zeros(prefix_codes.shape[0], dtype=torch.int64)
        for t in range(prefix_codes.shape[1]):
            nodes = self.child(t, nodes, prefix_codes[:, t].long())
        return nodes

    def valid_next_codes(self, prefix_codes: torch.Tensor) -> torch.Tensor:
        """``prefix_codes [R, t]`` (``t < L``) -> bool ``[R, V]`` mask of the codes that continue each prefix
        toward a real item (all False for a prefix no item has)."""
        if prefix_codes.ndim != 2 or prefix_codes.shape[1] >= self.depth:
            raise InputError(f"prefixes must be [R, t < {self.depth}], got {tuple(prefix_codes.shape)}")
        return self.next_code_mask(prefix_codes.shape[1], self.node_of_prefix(prefix_codes))
