"""Output directories of the jobs: never overlapping an input, one process at a time, old runs moved aside.

Three rules, shared by ``recsys.train`` and ``recsys.score``:

* :func:`check_output_dir`: an output directory that *is*, *lies inside* or *contains* one of the
  command's inputs (request files, dataset root, checkpoint; symlinks resolved) is refused before
  anything is written, ``overwrite=true`` included: a command never writes into, deletes or
  replaces its inputs.
* :func:`lock_run_dir`: a process using a run directory holds an exclusive ``fcntl.flock`` on
  ``<dir>/.recsys.lock`` (the file holds its pid); a second process is refused with an
  ``InputError`` naming the directory and the holder's pid. The kernel releases a flock when its
  holder dies, SIGKILL included, so a killed job never leaves a stale lock behind. The lock file
  itself stays (deleting it would race a process that just opened it).
* :func:`move_aside`: earlier outputs that a new run would mix with are moved, never deleted, into
  ``<dir>/previous-<timestamp>/``.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from recsys.errors import InputError

LOCK_NAME = ".recsys.lock"
PREVIOUS_PREFIX = "previous-"

_held: dict[Path, tuple[int, int]] = {}  # resolved dir -> (fd, depth): re-entrant within one process


def _relation(out: Path, inp: Path) -> str | None:
    """How ``out`` overlaps ``inp`` (both resolved): "is", "is inside", "contains", or None."""
    if out == inp:
        return "is"
    if out.is_relative_to(inp):
        return "is inside"
    if inp.is_relative_to(out):
        return "contains"
    return None


def check_output_dir(output_dir: str | Path, inputs: Iterable[tuple[str, str | Path | None]],
                     key: str = "output_dir") -> Path:
    """Refuse an output directory overlapping an input; returns it resolved.

    ``inputs``: ``(config key or role, path)`` pairs; ``None`` paths are skipped. Paths are compared
    after resolving symlinks (``Path.resolve``; a path that does not exist yet resolves through its
    existing parents), so a link to a dataset is the dataset.
    """
    out = Path(output_dir).resolve()
    for name, path in inputs:
        if path is None or str(path) == "":
            continue
        inp = Path(path).resolve()
        rel = _relation(out, inp)
        if rel is not None:
            shown = f"{name}={path}" + ("" if str(inp) == str(path) else f" ({inp})")
            raise InputError(f"{key}={output_dir} {rel} the input {shown}: a command never writes into its inputs "
                             f"(overwrite=true included); choose an {key} outside {inp}")
    if out.exists() and not out.is_dir():
        raise InputError(f"{key}={output_dir} exists and is not a directory")
    return out


def _holder_pid(lock_path: Path) -> str:
    try:
        return lock_path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def lock_run_dir(directory: str | Path, key: str = "output_dir") -> Iterator[Path]:
    """Create ``directory`` and hold an exclusive lock on it for the duration of the ``with`` block.

    Raises ``InputError`` naming the directory and the holder's pid when another process holds it.
    Re-entrant within one process (a nested claim of the same directory shares the lock).
    """
    d = Path(directory).resolve()
    if d in _held:
        fd, depth = _held[d]
        _held[d] = (fd, depth + 1)
        try:
            yield d
        finally:
            fd, depth = _held[d]
            _held[d] = (fd, depth - 1)
        return
    d.mkdir(parents=True, exist_ok=True)
    lock_path = d / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InputError(f"{key}={directory} is in use by another process (pid {_holder_pid(lock_path)}, lock "
                         f"{lock_path}): two jobs writing one directory would overwrite each other's files; "
                         f"wait for it to finish or use another {key}") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[d] = (fd, 1)
        yield d
    finally:
        _held.pop(d, None)
        os.close(fd)  # releases the flock


def move_aside(directory: Path, names: Iterable[str]) -> Path | None:
    """Move every existing ``directory/<name>`` into a new ``directory/previous-<timestamp>/``.

    Returns that folder, or None when none of the names exists. Renames only (same file system):
    nothing is copied or deleted.
    """
    present = [n for n in names if (directory / n).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = directory / f"{PREVIOUS_PREFIX}{stamp}"
    n = 1
    while target.exists():  # two fresh runs within one second
        target = directory / f"{PREVIOUS_PREFIX}{stamp}-{n}"
        n += 1
    target.mkdir()
    for name in present:
        os.replace(directory / name, target / name)
    return target
