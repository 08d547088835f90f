"""Jagged arrays, numpy (the loader) and torch (the model): ``values`` of all rows back to back plus ``offsets``.

Row ``i`` is ``values[offsets[i]:offsets[i + 1]]``. Example, rows ``[7, 3]``, ``[]``,
``[5]``::

    values  = [7, 3, 5]
    offsets = [0, 2, 2, 3]      # [N + 1], int64, offsets[0] == 0
    lengths = [2, 0, 1]         # [N]

Every operation is a gather with one index array built by :func:`range_index` (numpy) or
:func:`ranges` (torch); no Python loop over rows.

The torch helpers take the sizes the loader already knows (``total``, Python ints carried by
``RequestBatch.sizes``) so a forward pass never reads a size back from a tensor (a host sync on
an accelerator); without them they fall back to reading it (``int(offsets[-1])``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import numpy as np
import pyarrow as pa
import torch


def offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    """``lengths [N]`` -> ``offsets [N+1]`` int64 starting at 0."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def range_index(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenation of ``arange(starts[i], starts[i] + counts[i])`` over i, and its offsets.

    Returns ``(index [sum counts] int64, offsets [N+1] int64)``.
    """
    counts = np.asarray(counts, dtype=np.int64)
    offsets = offsets_from_lengths(counts)
    total = int(offsets[-1])
    index = np.arange(total, dtype=np.int64) + np.repeat(np.asarray(starts, dtype=np.int64) - offsets[:-1], counts)
    return index, offsets


@dataclass
class Jagged:
    """A jagged column: ``values [sum L_i]`` and ``offsets [N+1]`` (int64, starting at 0)."""

    values: np.ndarray
    """[sum L_i] flat values, row after row."""
    offsets: np.ndarray
    """[N+1] int64 row boundaries."""

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or self.offsets.size == 0 or self.offsets[0] != 0:
            raise ValueError("offsets must be 1-d, non-empty, starting at 0")
        if int(self.offsets[-1]) != len(self.values):
            raise ValueError(f"offsets end at {int(self.offsets[-1])} but there are {len(self.values)} values")

    @classmethod
    def from_lengths(cls, values: np.ndarray, lengths: np.ndarray) -> Jagged:
        return cls(values, offsets_from_lengths(lengths))

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """[N] int64."""
        return np.diff(self.offsets)

    def row_ids(self) -> np.ndarray:
        """[sum L_i] int64: the row each value belongs to."""
        return np.repeat(np.arange(self.num_rows, dtype=np.int64), self.lengths)

    def take(self, rows: np.ndarray) -> Jagged:
        """Rows in the given order (a permutation, a subset, repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64)
        index, offsets = range_index(self.offsets[rows], self.lengths[rows])
        return Jagged(self.values[index], offsets)

    def slice(self, start: int, stop: int) -> Jagged:
        """Rows ``start:stop`` (a view of the values)."""
        a, b = int(self.offsets[start]), int(self.offsets[stop])
        return Jagged(self.values[a:b], self.offsets[start:stop + 1] - a)

    def tail(self, max_len: int) -> Jagged:
        """Keeps the last ``max_len`` values of every row (the most recent events), order kept."""
        lengths = self.lengths
        if lengths.size == 0 or int(lengths.max()) <= max_len:
            return self
        keep = np.minimum(lengths, max_len)
        index, offsets = range_index(self.offsets[1:] - keep, keep)
        return Jagged(self.values[index], offsets)

    def map_values(self, values: np.ndarray) -> Jagged:
        """Same rows, other values (e.g. a gathered side feature)."""
        return Jagged(values, self.offsets)


def jagged_from_arrow(col: pa.ChunkedArray | pa.Array) -> Jagged:
    """A list<...> Arrow column (possibly sliced or chunked) as a :class:`Jagged` with offsets from 0."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    start, end = int(offsets[0]), int(offsets[-1])
    values = arr.values.slice(start, end - start).to_numpy(zero_copy_only=False)
    return Jagged(values, offsets - start)


# ---------------------------------------------------------------- torch (model side)
def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``lengths [B]`` -> ``offsets [B+1]`` int64 exclusive cumulative sum (fbgemm, no host sync)."""
    return torch.ops.fbgemm.asynchronous_complete_cumsum(lengths.to(torch.int64))


def kept_total(lengths: Sequence[int], budget: int) -> int:
    """``sum_b min(L_b, budget)`` of Python lengths: the row count :func:`keep_last` returns."""
    return sum(min(n, budget) for n in lengths)


def ranges(starts: torch.Tensor, counts: torch.Tensor, total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenation of ``arange(starts[i], starts[i] + counts[i])`` over i, and its offsets ``[N+1]``.

    ``total``: ``sum counts`` if known (no host sync), else read from the offsets.
    """
    offsets = lengths_to_offsets(counts)
    n = int(offsets[-1]) if total is None else total
    shift = torch.repeat_interleave(starts.to(torch.int64) - offsets[:-1], counts, output_size=n)
    return torch.arange(n, device=starts.device) + shift, offsets


def keep_last(offsets: torch.Tensor, budget: int, total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the last ``min(L_b, budget)`` entries of each jagged sequence.

    ``offsets [B+1]`` -> (row indices ``[sum kept]``, kept offsets ``[B+1]``). Example:
    offsets ``[0, 5, 5, 7]``, budget 3 -> rows ``[2, 3, 4, 5, 6]``, kept offsets ``[0, 3, 3, 5]``.
    ``total``: ``sum kept`` if known (:func:`kept_total`), else read from the offsets.
    """
    kept = (offsets[1:] - offsets[:-1]).clamp(max=budget)
    return ranges(offsets[1:] - kept, kept, total)


def segment_ids(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """``lengths [B]`` -> ``[total]`` int64: the sequence (request) index of every row of a jagged tensor
    (``total = sum lengths``, a Python int: no host sync)."""
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths.to(torch.int64),
                                   output_size=total)


def positions_in_sequence(offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """``offsets [B+1]`` -> ``[sum L_b]`` index of every row inside its own sequence
    (``total = sum L_b`` if known, e.g. ``values.shape[0]``)."""
    n = int(offsets[-1]) if total is None else total
    starts = torch.repeat_interleave(offsets[:-1], offsets[1:] - offsets[:-1], output_size=n)
    return torch.arange(n, device=offsets.device) - starts
