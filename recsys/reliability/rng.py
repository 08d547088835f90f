"""Every RNG that can affect training, as a ``torch.load(weights_only=True)``-safe dict.

Captured: torch's CPU generator, every CUDA device's generator (when CUDA is initialised),
Python's ``random`` and NumPy's legacy global generator. The data order does not depend on any
of them (the loader derives its own ``np.random.default_rng`` from ``data.loader.seed + epoch``),
but model code, samplers or augmentations added later may, so a resume restores all four.
Only tensors, ints, floats, strings and None are stored (no numpy arrays, no pickled objects).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    """The state of every RNG (see the module docstring)."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`. A checkpoint from before this module (only ``torch``) restores torch only."""
    torch.set_rng_state(state["torch"])
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(int(x) for x in p["mt"].tolist()), p["gauss"]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda, n = state["cuda"], torch.cuda.device_count()
        if len(cuda) != n:  # a different device set cannot replay the same random streams anyway
            print(f"[resume] checkpoint has RNG states of {len(cuda)} CUDA device(s), this process sees {n}: "
                  f"restoring the first {min(n, len(cuda))}")
        for i, s in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(s, device=i)
