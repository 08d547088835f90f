"""Small jagged-tensor index helpers shared by the tokenizer, the ranker and the serving cache.

Jagged layout: ``values [sum L_b, ...]`` with ``offsets [B+1]`` (or ``lengths [B]``).
"""

from __future__ import annotations

import torch


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """[B] -> [B+1] exclusive cumulative sum (int64)."""
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).to(torch.int64)


def keep_last(offsets: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the last ``min(L_b, budget)`` entries of each jagged sequence.

    ``offsets [B+1]`` -> (row indices ``[sum kept]``, kept offsets ``[B+1]``). Example:
    offsets ``[0, 5, 5, 7]``, budget 3 -> rows ``[2, 3, 4, 5, 6]``, kept offsets ``[0, 3, 3, 5]``.
    """
    lengths = offsets[1:] - offsets[:-1]
    kept = lengths.clamp(max=budget)
    kept_offsets = lengths_to_offsets(kept)
    starts = torch.repeat_interleave(offsets[1:] - kept - kept_offsets[:-1], kept)
    return torch.arange(int(kept_offsets[-1]), device=offsets.device) + starts, kept_offsets


def positions_in_sequence(offsets: torch.Tensor) -> torch.Tensor:
    """``offsets [B+1]`` -> ``[sum L_b]`` index of every row inside its own sequence."""
    lengths = offsets[1:] - offsets[:-1]
    return torch.arange(int(offsets[-1]), device=offsets.device) - torch.repeat_interleave(offsets[:-1], lengths)
