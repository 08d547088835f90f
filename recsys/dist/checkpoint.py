"""Distributed checkpoints: ``torch.distributed.checkpoint`` (DCP) for sharded state, one file for the rest.

Layout of ``<dir>/step_<N>/``: DCP files (``.metadata`` + one ``__<rank>_0.distcp`` per rank) holding
the sharded model and the keyed optimizer state (fused table accumulators are ShardedTensors, dense
state is replicated and written once), plus ``trainer.pt`` (rank 0: step counters, LR schedule,
world size, sharding plan). Written to ``.step_<N>.tmp`` and renamed by rank 0 after every rank
finished, so a crash mid-save leaves the previous checkpoints as they were. All ranks must see the
same directory (a shared file system when multi-node).

Retention is single-process training's (``recsys.reliability.checkpoint.retention_doomed``): the checkpoint just
written and the newest ``keep - 1`` below it are kept; one numbered above it is not this run's and is left
alone. :meth:`DistCheckpointer.load_latest` reads ``trainer.pt`` of the newest checkpoint that loads
(``load_checkpoint``: ``weights_only``, a damaged file reported and skipped), for the resume checks rank 0
makes before any collective load.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from recsys.reliability.checkpoint import load_checkpoint, require_keys, retention_doomed, step_of

_NAME = re.compile(r"^step_(\d+)$")


TRAINER_STATE = "trainer.pt"


class DistCheckpointer:
    """``step_<N>/`` DCP checkpoints in ``directory`` (see the module docstring)."""

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.dir = Path(directory)
        self.keep = keep

    def paths(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir()
                 if (m := _NAME.match(p.name)) and (p / ".metadata").is_file() and (p / TRAINER_STATE).is_file()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        paths = self.paths()
        return paths[-1] if paths else None

    def load_latest(self, required: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]] | None:
        """Newest checkpoint whose trainer state loads and holds every ``required`` key, with that state
        (not collective: the sharded part is read later by :meth:`load`); the others are reported and skipped."""
        for path in reversed(self.paths()):
            try:
                state = load_checkpoint(path / TRAINER_STATE)
                require_keys(state, required, path, "resume distributed training")
                return path, state
            except Exception as e:  # a truncated / foreign trainer state must not stop a resume
                print(f"[checkpoint] skipping unusable {path}: {type(e).__name__}: {e}")
        return None

    def save(self, step: int, sharded: dict[str, Any], trainer_state: dict[str, Any]) -> Path:
        """Collective: every rank passes its ``sharded`` state dict; rank 0's ``trainer_state`` is kept."""
        rank = dist.get_rank()
        final = self.dir / f"step_{step}"
        tmp = self.dir / f".step_{step}.tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        dcp.save(sharded, checkpoint_id=str(tmp))
        if rank == 0:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in retention_doomed([(step_of(p), p) for p in self.paths()], step, self.keep):
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    @staticmethod
    def saved_keys(path: Path) -> set[str]:
        """Flattened keys (``model.<param>``, ``optim.state.<param>.<name>``, ...) stored at ``path``."""
        return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)

    @staticmethod
    def load(path: Path, sharded: dict[str, Any]) -> dict[str, Any]:
        """Collective: reads ``path`` into ``sharded`` in place (resharding to this run's plan);
        returns the trainer state."""
        dcp.load(sharded, checkpoint_id=str(path))
        return load_checkpoint(path / TRAINER_STATE)
