"""TensorBoard scalars of a training run: every ``train_log.jsonl`` record, mirrored as it is written.

The event files go to ``<output_dir>/tensorboard/``, beside ``train_log.jsonl``; watch a run, or all of
them, with ``tensorboard --logdir runs/train``. Tags: ``train/<key>`` for the numbers of a training
record (``loss``, ``loss_<task>``, ``lr``, ``samples_per_s``), ``valid/<metric>`` for a validation
record's ``valid_<metric>`` keys; the x axis is the record's ``step``. Strings (a skipped step's
reason), ``None`` (a metric undefined on this split) and the bookkeeping keys are not scalars.

Resume. A run killed after its last checkpoint may have written events past it; the resumed run
drops those records from ``train_log.jsonl`` (``recsys.reliability.resume.trim_log``) and logs those
steps again. Its writer opens with ``purge_step = <checkpoint step> + 1``: TensorBoard then hides
every event of the earlier files at or after that step, so each step shows once, as in the log. A
fresh start (no checkpoint) removes the earlier event files instead, as it removes the log.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from recsys.errors import InputError

TENSORBOARD_DIR = "tensorboard"
_NOT_SCALARS = frozenset({"step", "epoch", "batch", "world_size"})
_FLUSH_SECS = 30  # a person watching the run sees new points within this; the default is 120 s


def scalar_tags(record: dict[str, Any]) -> dict[str, float]:
    """The ``{tag: value}`` scalars of one ``train_log.jsonl`` record (numbers only, bools excluded)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        tag = f"valid/{key.removeprefix('valid_')}" if key.startswith("valid_") else f"train/{key}"
        out[tag] = float(value)
    return out


def _summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; a missing ``tensorboard`` package is refused by name."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise InputError(
            f"train.tensorboard=true needs the tensorboard package ({exc}): install the project's dependencies "
            "(bash scripts/setup.sh, or pip install tensorboard), or set train.tensorboard=false") from None
    return SummaryWriter


def wait_for_a_later_second(directory: Path) -> None:
    """Sleep (at most a second) until the clock's whole second is past every event file's in ``directory``.

    TensorBoard reads a directory's event files in name order, and a name is ``events.out.tfevents.<10-digit
    second>.<host>.<pid>.<counter>``: within one second and one process the unpadded counter decides, so a
    resumed writer's file (counter 10) could sort before the earlier one's (counter 9) and its purge would
    hide the wrong events. Only an in-process resume within the same second meets this (a killed run's
    restart is always later); waiting costs nothing otherwise."""
    newest = max((int(p.name.split(".")[3]) for p in directory.glob("events.out.tfevents.*")
                  if p.name.split(".")[3:4] and p.name.split(".")[3].isdigit()), default=None)
    while newest is not None and int(time.time()) <= newest:
        time.sleep(0.05)


class TensorBoardLog:
    """The TensorBoard side of ``train_log.jsonl``: :meth:`open` once the start step is known, then
    :meth:`write` every record the log gets; a context manager closes it on any exit.

    Disabled (``enabled=False``: ``train.tensorboard=false``, or a rank other than 0) it does nothing.
    Enabled, it refuses a missing ``tensorboard`` package at construction, before any work starts.
    """

    def __init__(self, out_dir: Path, enabled: bool = True) -> None:
        self.dir = Path(out_dir) / TENSORBOARD_DIR
        self._writer_class = _summary_writer_class() if enabled else None
        self._writer: Any = None

    def open(self, start_step: int) -> None:
        """Starts the event file of a run that logs steps ``start_step + 1`` on (0: a fresh start)."""
        if self._writer_class is None:
            return
        if start_step == 0:  # a fresh start: an earlier attempt's events (killed before any checkpoint) go
            for old in self.dir.glob("events.out.tfevents.*"):
                old.unlink()
        else:
            wait_for_a_later_second(self.dir)
        self._writer = self._writer_class(log_dir=str(self.dir), flush_secs=_FLUSH_SECS,
                                          purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict[str, Any]) -> None:
        """Adds the scalars of one log record at its ``step``."""
        if self._writer is None:
            return
        for tag, value in scalar_tags(record).items():
            self._writer.add_scalar(tag, value, global_step=int(record["step"]))

    def close(self) -> None:
        """Flushes and closes the event file (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
