"""Shared pieces of the hostile-input suite: run a real CLI in a child process (``cli_runner.run_cli``), and prove that it left its
inputs untouched (SHA-256 of every file under a tree, taken before and compared after), and damage one data
page of a Parquet file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
from cli_runner import run_cli  # noqa: F401  (re-exported: the hostile tests' CLI harness)

from recsys.reliability.entry import INPUT_ERROR_EXIT

ROOT = Path(__file__).resolve().parents[2]
# ``python -c LOCK_HOLDER <dir>``: holds the run-directory lock of <dir> (``lock_run_dir``), prints "locked", sleeps
LOCK_HOLDER = ("import sys, time\nfrom recsys.reliability.rundir import lock_run_dir\n"
               "with lock_run_dir(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n")


def file_digests(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every regular file under ``root`` (a file counts as itself)."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)) if p != root else p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def assert_refused(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """The command was refused the way an operator mistake is (``recsys.errors.InputError``): exit status 2,
    one ``error:`` line naming every needle, and no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == INPUT_ERROR_EXIT, f"exit {proc.returncode}, want {INPUT_ERROR_EXIT}:\n{out[-3000:]}"
    assert "Traceback" not in out, f"a traceback instead of a message:\n{out[-3000:]}"
    for needle in needles:
        assert needle in proc.stderr, f"message does not name {needle!r}:\n{out[-3000:]}"


@contextmanager
def hold_lock(directory: Path) -> Iterator[subprocess.Popen]:
    """Another process holds the run-directory lock of ``directory`` for the duration of the block."""
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(directory)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def chunk_bytes(f: Path, row_group: int, column: str) -> range:
    """Byte offsets of one list column's chunk (dictionary + data pages) in row group ``row_group`` of ``f``."""
    md = pq.ParquetFile(f).metadata
    names = [md.schema.column(i).path for i in range(md.num_columns)]
    chunk = md.row_group(row_group).column(names.index(f"{column}.list.element"))
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    return range(start, start + chunk.total_compressed_size)


def flip_a_bit_in(f: Path, row_group: int, column: str) -> None:
    """One bit of the last bytes of a column chunk's data pages (inside the page, after its header)."""
    data = bytearray(f.read_bytes())
    data[chunk_bytes(f, row_group, column)[-4]] ^= 0x01
    f.write_bytes(bytes(data))
