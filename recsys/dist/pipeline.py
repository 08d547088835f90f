"""How the trainer's steps are driven over the batches of an epoch (``dist.pipeline``).

* :class:`Eager` (``none``; always in one process): take a batch, run the whole step on it.
* :class:`SparseDistPipeline` (``sparse_dist``; N ranks): torchrec's ``TrainPipelineSparseDist`` takes the
  batches. While step ``i`` runs, batch ``i+1`` is already copied to the device and its input all-to-all
  (the ids each rank sends to the tables' owners) started, and batch ``i+2`` read. The step's math is the
  trainer's own, unchanged: torchrec calls ``forward(batch)`` (the trainer's first half, on the sharded
  model whose sparse modules now read the prefetched input dist) and, where it would run
  ``loss.backward()``, :meth:`SparseDistPipeline._backward` runs the trainer's second half (non-finite
  guard on the global loss before backward, backward with the fused table update, gradient checks,
  clipping, dense step, schedule). torchrec's own optimizer step is a no-op here. Only the input copy and
  the all-to-all are reordered, so the losses and weights equal the eager steps' (tests/dist/test_pipeline.py).

The model keeps its names (no loss wrapper: the trainer computes the loss in ``forward``), so the
checkpoints of both drivers are the same files and a run may resume under the other one.

Both drivers take one iterator per epoch (every rank the same number of batches, ``steps_in_epoch``) and
return, per call, the step's result, the batch it trained on (on the device) and when the step began.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from recsys.dist.config import Pipeline

B = TypeVar("B")  # a batch (recsys.data.batch.RequestBatch)
F = TypeVar("F")  # the trainer's forward half's output
R = TypeVar("R")  # a step's result


def resolve_pipeline(choice: Pipeline | str, world_size: int, hash_buckets: int) -> Pipeline:
    """``auto`` -> ``sparse_dist`` when world_size > 1 and the model pipelines, else ``none``.

    A model pipelines when torchrec can start both sparse modules' input dist ahead: with
    ``model.item_embedding.hash_buckets > 0`` the sequence ids are hashed in the forward, so torchrec would
    run that module inline (docs/data.md); ``sparse_dist`` may still be asked for explicitly.
    """
    choice = Pipeline(choice)
    if choice != Pipeline.auto:
        return choice
    return Pipeline.sparse_dist if world_size > 1 and hash_buckets == 0 else Pipeline.none


class Eager(Generic[B, R]):
    """One batch, one whole step, in turn."""

    mode = Pipeline.none

    def __init__(self, step: Callable[[B], R]) -> None:
        self._step = step

    def step(self, batches: Iterator[B]) -> tuple[R, B, float]:
        """Train on the next batch of ``batches`` (StopIteration when it is exhausted); the third value is the
        ``time.perf_counter()`` at which the step began (after the batch was read)."""
        batch = next(batches)
        t0 = time.perf_counter()
        return self._step(batch), batch, t0

    def close(self) -> None:
        pass


class _GuardedSparseDist(TrainPipelineSparseDist):
    """``TrainPipelineSparseDist`` whose backward + optimizer step is the trainer's update (module docstring)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 forward: Callable[[Any], Any], update: Callable[[Any], Any]) -> None:
        super().__init__(model, optimizer, device, execute_all_batches=True,
                         custom_model_fwd=lambda batch: (forward(batch), None))
        self._update = update
        self.result: Any = None
        self.batch: Any = None

    def _backward(self, losses: Any) -> None:
        """``losses`` is the trainer's forward output; this runs the whole update of ``self.batches[0]``."""
        self.batch = self.batches[0]
        self.result = self._update(losses)

    def _optimizer_step(self) -> None:
        """The trainer's update already stepped the optimizers (or skipped the step)."""


class SparseDistPipeline(Generic[B, F, R]):
    """torchrec's ``TrainPipelineSparseDist`` driving ``forward`` / ``update`` (module docstring).

    ``model``: the ``DistributedModelParallel`` module ``forward`` calls; ``optimizer``: its dense optimizer
    (torchrec zeroes its gradients before each forward). One instance per run: the model's sparse modules are
    rewritten once and the pipeline refills at each epoch's iterator.
    """

    mode = Pipeline.sparse_dist

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 forward: Callable[[B], F], update: Callable[[F], R]) -> None:
        self.pipe = _GuardedSparseDist(model, optimizer, device, forward, update)

    def step(self, batches: Iterator[B]) -> tuple[R, B, float]:
        """Train on the next batch (prefetching up to two more from ``batches``); StopIteration when none is left.
        The third value is the ``time.perf_counter()`` at which the call began (it includes the reading ahead).

        ``batches`` must be the same iterator for every call of one epoch (the pipeline holds batches read ahead).
        """
        t0 = time.perf_counter()
        self.pipe.progress(batches)
        return self.pipe.result, self.pipe.batch, t0

    @property
    def pipelined_modules(self) -> list[str]:
        """Type names of the sparse modules whose input dist runs one batch ahead (after the first step)."""
        return sorted(type(m).__name__ for m in self.pipe._pipelined_modules)

    def close(self) -> None:
        """The model's original forwards back (for any later direct call: evaluation, export)."""
        self.pipe.detach()
