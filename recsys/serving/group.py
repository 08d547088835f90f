"""The scoring job's process group: one process, or the ranks ``torchrun`` started.

Under ``torchrun --nproc_per_node N -m recsys.score ...`` (``WORLD_SIZE`` in the environment) the job
joins a gloo process group (env:// rendezvous; gloo carries only small Python objects here, the scores
never cross processes, so it serves CPU and GPU ranks alike). Without torchrun it is a group of one and
no ``torch.distributed`` call is made: a plain ``python -m recsys.score`` behaves as it always did.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from recsys.dist.coordination import on_rank0

T = TypeVar("T")


class JobGroup:
    """``rank`` / ``world`` of this process and the three collectives the job uses."""

    def __init__(self, distributed: bool) -> None:
        self.distributed = distributed
        self.rank = dist.get_rank() if distributed else 0
        self.world = dist.get_world_size() if distributed else 1

    def on_rank0(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, its result (or its refusal: ``recsys.dist.coordination.on_rank0``) on every rank."""
        return on_rank0(fn) if self.distributed else fn()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda`` -> ``cuda:<LOCAL_RANK mod #GPUs>`` under torchrun (more ranks than GPUs
        share them), else ``device`` as is."""
        if self.distributed and device.type == "cuda" and device.index is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count()))
        return device


@contextmanager
def job_group() -> Iterator[JobGroup]:
    """Join torchrun's process group when launched by it (and leave it after), else a group of one."""
    launched = "WORLD_SIZE" in os.environ and dist.is_available()
    created = False
    if launched and not dist.is_initialized():
        dist.init_process_group("gloo")
        created = True
    try:
        yield JobGroup(launched)
    finally:
        if created:
            dist.destroy_process_group()
