"""Atomic, verified, pickle-free-on-load checkpoints.

Write protocol of ``step_<N>.pt`` (:meth:`CheckpointManager.save`):

1. ``torch.save`` into ``.step_<N>.pt.tmp-<pid>``, flush, fsync;
2. SHA-256 of the temp file's bytes -> ``step_<N>.pt.sha256`` (itself temp + fsync + rename);
3. ``os.replace`` temp -> ``step_<N>.pt``, fsync the directory; prune (:meth:`CheckpointManager.prune`).

A crash at any point leaves the previous checkpoints intact and at most a temp file (deleted by
the next save / resume). Loading (:func:`load_checkpoint`) checks the digest when the sidecar
exists (bit rot in tensor bytes would otherwise load silently: ``torch.load`` does not check
CRCs of stored tensors) and uses ``torch.load(weights_only=True)``, so a file carrying a pickled
code payload is refused instead of executed. :meth:`CheckpointManager.load_latest` falls back
to the next older checkpoint when the newest does not load or verify.

Retention (:func:`retention_doomed`, also used by ``recsys.dist``'s DCP checkpoints) never deletes the checkpoint just
written: it keeps that one and the newest ``keep - 1`` checkpoints numbered *below* it. A file numbered above it cannot be this run's (a resume continues
from the newest checkpoint that loads), so it is left as it is, neither counted nor deleted.

A write that fails for lack of space removes its temp file and raises
:class:`~recsys.reliability.atomic.OutOfSpaceError` naming the checkpoint.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from recsys.errors import InputError
from recsys.reliability.atomic import atomic_write_bytes, fsync_dir, space_error, temp_path
from recsys.reliability.digest import file_sha256
from recsys.reliability.faults import fault_point

_NAME = re.compile(r"^step_(\d+)\.pt$")
_ANY_STEP = re.compile(r"^step_(\d+)(\.pt)?$")  # a file checkpoint or a DCP checkpoint directory
_TMP = re.compile(r"^\.step_\d+\.pt(\.sha256)?\.tmp-(\d+)$")
DIGEST_SUFFIX = ".sha256"


class CheckpointError(InputError):
    """A checkpoint file is unreadable, truncated, not a training checkpoint, or does not match its digest."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint that needs arbitrary code to load (``torch.load(weights_only=True)`` refused it)."""


def step_of(path: Path) -> int:
    """N of ``step_<N>.pt`` (a checkpoint file) or ``step_<N>`` (a distributed checkpoint's directory)."""
    m = _ANY_STEP.match(path.name)
    if m is None:
        raise ValueError(f"{path} is not named step_<N>.pt or step_<N>")
    return int(m.group(1))


def retention_doomed(found: list[tuple[int, Path]], current: int, keep: int) -> list[Path]:
    """What retention deletes after the checkpoint of step ``current`` was written: of the ``(step, path)``
    checkpoints ``found``, those below ``current`` except the newest ``keep - 1`` of them. The one just
    written is never among them, and neither is one numbered above it (not this run's: a resume continues
    from the newest checkpoint that loads). The one rule of ``CheckpointManager`` and ``DistCheckpointer``."""
    older = sorted((step, path) for step, path in found if step < current)
    return [path for _, path in older[: max(0, len(older) - (keep - 1))]]


class CheckpointManager:
    """``step_<N>.pt`` files in ``directory``; keeps the one just written and ``keep - 1`` older ones."""

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
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                fault_point("checkpoint.mid_write", f)
                os.fsync(f.fileno())
            atomic_write_bytes(final.with_name(final.name + DIGEST_SUFFIX), (file_sha256(tmp) + "\n").encode())
        except BaseException as exc:  # e.g. disk full (torch reports it as a RuntimeError), or the digest's write
            tmp.unlink(missing_ok=True)
            if isinstance(exc, (OSError, RuntimeError)) and (err := space_error(final, exc)) is not None:
                raise err from exc
            raise
        fault_point("checkpoint.before_rename")
        os.replace(tmp, final)
        fsync_dir(self.dir)
        self.prune(step)
        return final

    def prune(self, current: int) -> list[Path]:
        """Keep ``step_<current>.pt`` and the newest ``keep - 1`` below it; returns what was deleted."""
        doomed = retention_doomed([(step_of(p), p) for p in self.paths()], current, self.keep)
        for old in doomed:
            old.unlink(missing_ok=True)
            old.with_name(old.name + DIGEST_SUFFIX).unlink(missing_ok=True)
        return doomed

    def load_latest(self, required: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]] | None:
        """Newest checkpoint that loads, verifies and holds every ``required`` key; the others are
        reported and skipped."""
        self.remove_stale_temps()
        for path in reversed(self.paths()):
            try:
                state = load_checkpoint(path)
                require_keys(state, required, path, "resume training")
                return path, state
            except Exception as e:  # a truncated / corrupt / foreign file must not stop a resume
                print(f"[checkpoint] skipping unusable {path}: {type(e).__name__}: {e}")
        return None


def require_keys(state: dict[str, Any], keys: tuple[str, ...], path: Path, purpose: str) -> None:
    """Raise :class:`CheckpointError` naming ``path`` and the missing keys when ``state`` lacks any of ``keys``."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} cannot {purpose}: it lacks {missing} (not a full training "
                              "checkpoint of this version)")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict at ``path``: digest checked (when recorded), then ``torch.load(weights_only=True)``.

    Raises :class:`CheckpointError` (an ``InputError``) naming the file on a digest mismatch, on a file
    that is not a torch checkpoint (text, truncated zip...) or holds no dict, and
    :class:`UnsafeCheckpointError` (also a ``pickle.UnpicklingError``) on a file that needs arbitrary code
    to load (e.g. a pickled ``__reduce__`` payload): nothing in it is executed.
    """
    path = Path(path)
    digest_file = path.with_name(path.name + DIGEST_SUFFIX)
    if digest_file.is_file():
        want = digest_file.read_text().strip()
        got = file_sha256(path)
        if got != want:
            raise CheckpointError(f"checkpoint {path} is corrupt: SHA-256 {got[:16]}... != recorded {want[:16]}... "
                                  f"in {digest_file.name}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; torch.load would call text "unsafe"
        raise CheckpointError(f"checkpoint {path} is not a readable torch checkpoint (not a torch.save zip archive: "
                              "truncated, empty, or another kind of file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"checkpoint {path} was refused, it needs code execution to load: {e}") from None
    except Exception as e:  # torch reports a foreign file as KeyError / RuntimeError / EOFError...
        raise CheckpointError(f"checkpoint {path} is not a readable torch checkpoint "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


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
        raise InputError("\n".join(lines))
    model.load_state_dict(state)
