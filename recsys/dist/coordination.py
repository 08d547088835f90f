"""Decisions one rank takes for all: rank 0 runs it, every rank gets its outcome, refusals included.

Why: the run directory's lock and the resume decision (move the old run aside, refuse ``resume=false``
into a directory with checkpoints, check the checkpoint's run configuration) act on shared files, so one
rank must take them, and once. If rank 0 raised alone, the other ranks would wait in their next
collective until the process group's timeout (30 minutes by default); here they wait in the broadcast
that carries rank 0's outcome, and raise the same error at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from recsys.errors import InputError

T = TypeVar("T")


class RankZeroFailed(RuntimeError):
    """Raised on the other ranks when rank 0 failed with an error that is not an operator mistake."""


def on_rank0(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0; its result (picklable) on every rank. Collective: every rank must call it.

    An exception on rank 0 is raised again on rank 0 and, on every other rank, as an ``InputError`` with
    the same message (``InputError`` on rank 0: every rank exits 2 with the same ``error:`` line) or as
    :class:`RankZeroFailed` naming it.
    """
    box: list[object] = [None, None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except Exception as e:  # broadcast before re-raising: the other ranks are waiting for the outcome
            error = e
            box[1] = (isinstance(e, InputError), f"{type(e).__name__}: {e}" if not isinstance(e, InputError)
                      else str(e))
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        is_input, message = box[1]
        raise InputError(message) if is_input else RankZeroFailed(f"rank 0 failed: {message}")
    return box[0]  # type: ignore[return-value]
