"""Atomic, pickle-free-on-load checkpoints.

Written as ``step_<N>.pt`` via temp file + fsync + rename (a crash mid-write leaves
the previous checkpoints intact); loaded with ``torch.load(weights_only=True)``, so a
file carrying a pickled code payload is refused instead of executed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointManager:
    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.dir = Path(directory)
        self.keep = keep

    def paths(self) -> list[Path]:
        """Checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step_{step}.pt"
        tmp = self.dir / f".step_{step}.pt.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return final

    def load_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """Newest checkpoint that loads; unreadable ones are reported and skipped."""
        for path in reversed(self.paths()):
            try:
                return path, load_checkpoint(path)
            except Exception as e:  # a truncated / foreign file must not stop a resume
                print(f"[checkpoint] skipping unreadable {path}: {type(e).__name__}: {e}")
        return None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with an error that names every missing / unexpected / mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        lines = [f"checkpoint {source} does not match this model config:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:10]}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:10]}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): " + "; ".join(shapes[:10]))
        raise ValueError("\n".join(lines))
    model.load_state_dict(state)
