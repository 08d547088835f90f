"""Crash points for the kill tests: inert unless the ``RECSYS_FAULT`` environment variable is set.

``RECSYS_FAULT="<point>[@<n>]"`` makes the process ``SIGKILL`` itself the ``n``-th time (1-based,
default 1) it reaches the named point. Points:

``checkpoint.mid_write``
    inside :meth:`~recsys.reliability.checkpoint.CheckpointManager.save`: the temp file is cut to half
    its bytes (a torn write), then the process dies before fsync / rename.
``checkpoint.before_rename``
    the temp file is complete and fsynced, the process dies before ``os.replace``.
``train.after_step``
    the process dies after the ``n``-th training iteration of this process (applied or skipped step,
    logged and checkpointed as due): a kill between checkpoints, at the same point on every rank.

Value faults (:func:`fault_now`: true the ``n``-th time, nothing killed), for the non-finite guard:

``train.nonfinite_grad``
    the ``n``-th training step keeps a finite loss, but its gradients become Inf / NaN.

Production code calls :func:`fault_point` / :func:`fault_now` at those places; with the variable unset
each is one dictionary lookup. Nothing else reads the variable.
"""

from __future__ import annotations

import os
import signal
from typing import IO

ENV = "RECSYS_FAULT"
POINTS = ("checkpoint.mid_write", "checkpoint.before_rename", "train.after_step", "train.nonfinite_grad")
_hits: dict[str, int] = {}


def parse_fault(spec: str) -> tuple[str, int]:
    """``"point@n"`` -> ``(point, n)``; raises ``ValueError`` naming the unknown point or bad count."""
    name, _, count = spec.partition("@")
    if name not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown fault point {name!r}; known: {list(POINTS)}")
    try:
        n = int(count) if count else 1
    except ValueError:
        raise ValueError(f"{ENV}={spec!r}: count after '@' must be an integer") from None
    if n < 1:
        raise ValueError(f"{ENV}={spec!r}: count after '@' must be >= 1")
    return name, n


def fault_now(name: str) -> bool:
    """True when ``RECSYS_FAULT`` names this point and this is its n-th hit (counted per process)."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    target, n = parse_fault(spec)
    if target != name:
        return False
    _hits[name] = _hits.get(name, 0) + 1
    return _hits[name] == n


def fault_point(name: str, file: IO[bytes] | None = None) -> None:
    """SIGKILL this process here if ``RECSYS_FAULT`` names this point and this is its n-th hit.

    ``file``: an open file being written; it is truncated to half its size first (a torn write).
    """
    if not fault_now(name):
        return
    if file is not None:
        file.flush()
        size = file.tell()
        file.truncate(size // 2)
        file.flush()
    os.kill(os.getpid(), signal.SIGKILL)
