"""Atomic, verified, pickle-free-on-load checkpoints.

Write protocol of ``step_<N>.pt`` (:meth:`CheckpointManager.save`):

1. ``torch.save`` into ``.step_<N>.pt.tmp-<pid>``, flush, fsync;
2. SHA-256 of the temp file's bytes -> ``step_<N>.pt.sha256`` (itself temp + fsync + rename);
3. ``os.replace`` temp -> ``step_<N>.pt``, fsync the directory; prune to the newest ``keep``.

A crash at any point leaves the previous checkpoints intact and at most a temp file (deleted by
the next save / resume). Loading (:func:`load_checkpoint`) checks the digest when the sidecar
exists (bit rot in tensor bytes would otherwise load silently: ``torch.load`` does not check
CRCs of stored tensors) and uses ``torch.load(weights_only=True)``, so a file carrying a pickled
code payload is refused instead of executed. :meth:`CheckpointManager.load_latest` falls back
to the next older checkpoint when the newest does not load or verify.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch

from recsys.reliability.atomic import atomic_write_bytes, fsync_dir, temp_path
from recsys.reliability.faults import fault_point

_NAME = re.compile(r"^step_(\d+)\.pt$")
_TMP = re.compile(r"^\.step_\d+\.pt(\.sha256)?\.tmp-(\d+)$")
DIGEST_SUFFIX = ".sha256"


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable, truncated, or does not match its recorded digest."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class CheckpointManager:
    """``step_<N>.pt`` files in ``directory``; keeps the newest ``keep``."""

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.dir = Path(directory)
        self.keep = keep

    def paths(self) -> list[Path]:
        """Checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def remove_stale_temps(self) -> list[Path]:
        """Delete temp files left by a process killed mid-save (not this process's own)."""
        if not self.dir.is_dir():
            return []
        me = str(os.getpid())
        stale = [p for p in self.dir.iterdir() if (m := _TMP.match(p.name)) and m.group(2) != me]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` as ``step_<step>.pt`` atomically (see the module docstring); returns its path."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temps()
        final = self.dir / f"step_{step}.pt"
        tmp = temp_path(final)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            fault_point("checkpoint.mid_write", f)
            os.fsync(f.fileno())
        atomic_write_bytes(final.with_name(final.name + DIGEST_SUFFIX), (file_sha256(tmp) + "\n").encode())
        fault_point("checkpoint.before_rename")
        os.replace(tmp, final)
        fsync_dir(self.dir)
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
            old.with_name(old.name + DIGEST_SUFFIX).unlink(missing_ok=True)
        return final

    def load_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """Newest checkpoint that loads and verifies; broken ones are reported and skipped."""
        self.remove_stale_temps()
        for path in reversed(self.paths()):
            try:
                return path, load_checkpoint(path)
            except Exception as e:  # a truncated / corrupt / foreign file must not stop a resume
                print(f"[checkpoint] skipping unusable {path}: {type(e).__name__}: {e}")
        return None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict at ``path``: digest checked (when recorded), then ``torch.load(weights_only=True)``.

    Raises :class:`CheckpointError` on a digest mismatch, ``pickle.UnpicklingError`` on a file that
    needs arbitrary code to load (e.g. a pickled ``__reduce__`` payload): nothing in it is executed.
    """
    path = Path(path)
    digest_file = path.with_name(path.name + DIGEST_SUFFIX)
    if digest_file.is_file():
        want = digest_file.read_text().strip()
        got = file_sha256(path)
        if got != want:
            raise CheckpointError(f"checkpoint {path} is corrupt: SHA-256 {got[:16]}... != recorded {want[:16]}... "
                                  f"in {digest_file.name}")
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
