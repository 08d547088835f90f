"""Deterministic output partitions, written atomically, so a scoring job can be killed and resumed.

Plan: the input files' row groups (file order, then row-group order, from the Parquet footers)
cut into ranges of at most ``rows_per_partition`` rows; range ``i`` becomes
``<output_dir>/part-<i:05d>.parquet``. The plan depends only on the inputs and the settings, so
a rerun derives the same names.

Atomicity: a partition is written to ``.part-<i>.parquet.tmp-<pid>``, fsynced, renamed to its
final name (``os.replace``: atomic on POSIX) and the directory is fsynced. A final name
therefore always holds a complete file; a SIGKILL leaves at most a temp file, which the next
run deletes. "Done" = the final file exists; a rerun skips done partitions, so there are
neither duplicates nor gaps.

``_job.json`` records the plan and a fingerprint of everything that changes the output bytes
(checkpoint identity, inputs, mode, settings); a rerun with a different fingerprint refuses to
mix outputs (or, with ``overwrite``, starts over). A directory holding partitions or a summary but
no ``_job.json`` was not written by a scoring job and is refused whatever ``overwrite`` says.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recsys.data.loader import ReadUnit, row_group_units
from recsys.errors import InputError
from recsys.reliability.atomic import atomic_write, atomic_write_bytes
from recsys.reliability.digest import json_digest

JOB_FILE = "_job.json"
PART_PREFIX = "part-"


@dataclass(frozen=True)
class Partition:
    """Output partition ``index``: rows ``start:stop`` of one row group of one input file."""

    index: int
    file: str
    row_group: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{PART_PREFIX}{self.index:05d}.parquet"

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    @property
    def unit(self) -> ReadUnit:
        return ReadUnit(self.file, self.row_group, self.start, self.stop)


def plan_partitions(files: list[Path], rows_per_partition: int) -> list[Partition]:
    """Every input row exactly once, in file / row-group / row order."""
    parts: list[Partition] = []
    for u in row_group_units([Path(f) for f in files]):
        for s in range(u.start, u.stop, rows_per_partition):
            parts.append(Partition(len(parts), u.file, u.row_group, s, min(u.stop, s + rows_per_partition)))
    return parts


def write_partition(path: Path, table: pa.Table) -> None:
    """Atomic Parquet write of one partition."""
    atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd"))


def remove_temp_files(directory: Path) -> int:
    """Delete leftovers of killed writers (``.part-*.tmp-*``, ``._job.json.tmp-*``...); returns how many."""
    n = 0
    for p in directory.glob(".*.tmp-*"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def finished(directory: Path, parts: list[Partition]) -> set[int]:
    """Indices of partitions whose final file exists."""
    return {p.index for p in parts if (directory / p.name).is_file()}


def prepare_output(directory: Path, job: dict[str, Any], parts: list[Partition], overwrite: bool) -> None:
    """Create ``directory`` / check it belongs to this job; write ``_job.json`` (fingerprint + plan).

    Raises ``InputError`` when it holds another scoring job's partitions and ``overwrite`` is False,
    and, ``overwrite`` or not, when it holds ``part-*.parquet`` / ``summary.json`` files but no
    ``_job.json``: no scoring job wrote those (a dataset split's files are named ``part-*.parquet``
    too), so they are never deleted or replaced. ``overwrite`` deletes only files of a directory
    that a scoring job's ``_job.json`` marks as its own.
    """
    directory.mkdir(parents=True, exist_ok=True)
    remove_temp_files(directory)
    fp = json_digest(job)
    job_path = directory / JOB_FILE
    if not job_path.is_file():
        foreign = sorted(p.name for p in directory.glob(f"{PART_PREFIX}*.parquet"))
        foreign += ["summary.json"] if (directory / "summary.json").exists() else []
        if foreign:
            raise InputError(f"output_dir {directory} holds {', '.join(foreign[:5])}"
                             f"{' ...' if len(foreign) > 5 else ''} but no {JOB_FILE}: files no scoring job "
                             "wrote are never deleted or replaced (overwrite=true included); use another output_dir")
    else:
        old = json.loads(job_path.read_text())
        if old.get("fingerprint") == fp:
            return
        if not overwrite:
            raise InputError(f"output_dir {directory} holds outputs of a different scoring job (fingerprint "
                             f"{old.get('fingerprint')} != {fp}); use another output_dir or overwrite=true")
        for p in directory.glob(f"{PART_PREFIX}*.parquet"):
            p.unlink()
        (directory / "summary.json").unlink(missing_ok=True)
    record = {"fingerprint": fp, "job": job, "partitions": [asdict(p) for p in parts]}
    atomic_write_bytes(job_path, json.dumps(record, indent=2, default=str).encode())
