"""Crash-safe file writes: a reader sees the old file or the complete new one, never a torn one.

Pattern: write a temp file next to the target, flush + fsync it, ``os.replace`` it over the target
(atomic on POSIX within one file system), fsync the directory so the rename itself is durable.
Temp names are ``.<name>.tmp-<pid>`` so a cleaner can tell a dead writer's leftovers from its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(directory: Path) -> None:
    """Make a rename / create inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}"


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """``path`` gets what ``write(f)`` writes to a binary file completely or not at all."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """``path`` gets ``data`` completely or not at all."""
    atomic_write(path, lambda f: f.write(data))
