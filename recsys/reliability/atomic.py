"""Crash-safe file writes: a reader sees the old file or the complete new one, never a torn one.

Pattern: write a temp file next to the target, flush + fsync it, ``os.replace`` it over the target
(atomic on POSIX within one file system), fsync the directory so the rename itself is durable.
Temp names are ``.<name>.tmp-<pid>`` so a cleaner can tell a dead writer's leftovers from its own.

A write that fails for lack of space (``ENOSPC``, a quota, or a file-size limit: ``EFBIG``) removes
its temp file and raises :class:`OutOfSpaceError` naming the target, instead of the raw ``OSError``
(or torch's ``RuntimeError: [enforce fail at inline_container.cc]`` that wraps it).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from recsys.errors import InputError

_SPACE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EFBIG: "file too large for the file-size limit"}


class OutOfSpaceError(InputError):
    """A file could not be written: no space left on its device (or a quota / file-size limit)."""


def space_error(path: Path, exc: BaseException) -> OutOfSpaceError | None:
    """An :class:`OutOfSpaceError` naming ``path`` when ``exc`` (or an exception it wraps) is an out-of-space
    ``OSError``; None for any other failure. torch's zip writer turns the ``OSError`` of a failed ``write``
    into a ``RuntimeError`` whose context is the original error, hence the walk along ``__context__``."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain of wrapped exceptions is short; bounded in case of a cycle
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in _SPACE_ERRNOS:
            return OutOfSpaceError(f"could not write {path}: no space left ({_SPACE_ERRNOS[seen.errno]}: {seen}); "
                                   f"free space under {path.parent} and rerun")
        seen = seen.__cause__ or seen.__context__
    return None


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
    except (OSError, RuntimeError) as exc:
        if (err := space_error(path, exc)) is not None:
            raise err from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """``path`` gets ``data`` completely or not at all."""
    atomic_write(path, lambda f: f.write(data))
