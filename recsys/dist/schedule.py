"""Learning-rate multiplier of the dense optimizer: linear warm-up, then constant or cosine decay."""

from __future__ import annotations

import math


def lr_multiplier(step: int, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    """Factor on the base learning rate at optimizer step ``step`` (0-based).

    ``warmup`` steps ramp linearly to 1; then ``decay == "constant"`` stays at 1 and
    ``decay == "cosine"`` follows half a cosine from 1 down to ``min_ratio`` at ``total``.
    """
    warmup = max(1, warmup)
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
