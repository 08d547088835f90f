"""Shard-local, seeded initial values of the torchrec tables, and the device the tables are built on.

Every table's initial weight ``[N, D]`` is a function of (base seed, table name, row) only:

* rows are cut into blocks of ``min(BLOCK_ROWS, N)`` rows; block ``b`` is ``U(low, high)`` of shape
  ``[block_rows, D]`` drawn from its own ``torch.Generator`` seeded by
  ``numpy.random.SeedSequence([base, crc32(name), b])`` (a well-mixed 32-bit seed: torch's CPU
  generator uses 32 bits of a seed);
* ``low, high`` are torchrec's defaults, ``-/+ sqrt(1 / N)``; tables that must start at zero
  (``low == high == 0``) are filled without drawing.

So any part of a table -- a row-wise shard, a table-wise whole table, a column-wise shard's
columns -- gets exactly the values the full table would have, by drawing only the blocks it
covers. ``__call__`` is the torchrec ``init_fn``: on a plain tensor it fills the whole table; on a
``ShardedTensor`` (what a torchrec-sharded module passes when DMP builds it) it fills only this
rank's local shards, from their offsets. Extra memory: one block (``4096 x D`` floats).

Why per-block seeds, not one generator stream per table cut into chunks (keeping the local rows):
both bound peak memory to a chunk, but a single stream makes every rank draw the whole table (the
stream must be replayed up to its first row), W times the total work over W ranks; with
block seeds a row-wise shard costs its own rows plus at most two partial blocks.

The base seed is one draw from the global torch RNG per :func:`builds_tables` constructor, so
``torch.manual_seed(s)`` still decides the tables; the constructor runs with the global RNG forked
(see :func:`builds_tables`).
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

BLOCK_ROWS = 4096
"""Rows per seeded block (fixed: changing it changes every table's initial values)."""

_TABLE_DEVICE: ContextVar[str] = ContextVar("recsys_table_device", default="cpu")
_BASE_SEED: ContextVar[int | None] = ContextVar("recsys_table_base_seed", default=None)
F = TypeVar("F", bound=Callable[..., None])


def table_device() -> torch.device:
    """Where torchrec tables are created now: ``cpu`` unless inside :func:`tables_on`."""
    return torch.device(_TABLE_DEVICE.get())


@contextmanager
def tables_on(device: torch.device) -> Iterator[None]:
    """Tables built inside are created on ``device`` (``meta``: shapes only, no memory, no init)."""
    token = _TABLE_DEVICE.set(str(torch.device(device)))
    try:
        yield
    finally:
        _TABLE_DEVICE.reset(token)


def builds_tables(init: F) -> F:
    """Decorates the ``__init__`` of a module that creates torchrec tables with :func:`seeded_init`.

    Draws the base seed (one ``torch.randint`` from the global RNG) and runs the constructor with the
    global RNG forked. Why forked: torchrec's constructors first run ``nn.Embedding``'s own
    ``normal_`` init (overwritten by ``init_fn`` right after), which draws from the global RNG on
    CPU and draws nothing on meta; forked, the modules built after the tables get the same initial
    weights whichever device the tables were built on.
    """
    @functools.wraps(init)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        base = int(torch.randint(0, 2**31 - 1, (1,)).item())
        token = _BASE_SEED.set(base)
        try:
            with torch.random.fork_rng(devices=[]):
                init(*args, **kwargs)
        finally:
            _BASE_SEED.reset(token)
    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class SeededTableInit:
    """torchrec ``init_fn`` of one table: ``U(low, high)`` by seeded row blocks (module docstring)."""

    base_seed: int
    table: str
    num_rows: int
    low: float
    high: float

    def block(self, b: int, block_rows: int, dim: int) -> torch.Tensor:
        """Block ``b``: ``[block_rows, dim]`` float32 (rows ``b * block_rows ...`` of the table)."""
        seed = int(np.random.SeedSequence([self.base_seed, zlib.crc32(self.table.encode()), b]).generate_state(1)[0])
        gen = torch.Generator().manual_seed(seed)
        return torch.empty(block_rows, dim).uniform_(self.low, self.high, generator=gen)

    def rows(self, lo: int, hi: int, num_rows: int, dim: int, cols: slice = slice(None)) -> Iterator[
            tuple[int, torch.Tensor]]:
        """Yields ``(row, values [n, d])`` pieces covering rows ``[lo, hi)`` of the ``[num_rows, dim]``
        table (columns ``cols``), one seeded block at a time."""
        block_rows = max(1, min(BLOCK_ROWS, num_rows))
        for b in range(lo // block_rows, math.ceil(hi / block_rows)):
            start = b * block_rows
            a, z = max(lo, start), min(hi, start + block_rows)
            if self.low == self.high:
                yield a, torch.full((z - a, dim), self.low)[:, cols]
            else:
                yield a, self.block(b, block_rows, dim)[a - start:z - start, cols]

    @torch.no_grad()
    def fill(self, dst: torch.Tensor, row0: int, col0: int, num_rows: int, dim: int) -> None:
        """Writes the table's values at rows ``row0 + [0, n)``, columns ``col0 + [0, d)`` into ``dst [n, d]``."""
        n, d = dst.shape
        for row, vals in self.rows(row0, row0 + n, num_rows, dim, slice(col0, col0 + d)):
            dst[row - row0:row - row0 + len(vals)].copy_(vals)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        """Fills a table weight in place: a plain ``[N, D]`` tensor whole, a ``ShardedTensor`` shard by shard
        (from each local shard's offsets)."""
        if isinstance(weight, ShardedTensor):
            num_rows, dim = weight.size()
            for shard in weight.local_shards():
                (r0, c0), t = shard.metadata.shard_offsets, shard.tensor
                self.fill(t.detach(), r0, c0, num_rows, dim)
        elif weight.device.type != "meta" and weight.ndim == 2 and weight.shape[0] == self.num_rows:
            self.fill(weight.detach(), 0, 0, weight.shape[0], weight.shape[1])
        # else nothing: meta (DMP materialises the shards later); or what torchrec's sharded modules pass
        # from their reset_parameters, a bare local row shard without its offsets (or an empty placeholder
        # where a table has no shard): recsys.dist.sharding.init_local_shards fills the shards by their
        # ShardedTensor metadata
        return weight


def seeded_init(table: str, num_embeddings: int, zeros: bool = False) -> SeededTableInit:
    """The ``init_fn`` of table ``table`` (torchrec's default range ``+/- sqrt(1/N)``, or all zeros).

    Call inside a :func:`builds_tables` constructor (it holds the base seed).
    """
    base = _BASE_SEED.get()
    if base is None:
        raise RuntimeError("seeded_init() is called from a constructor decorated with @builds_tables")
    bound = 0.0 if zeros else math.sqrt(1.0 / num_embeddings)
    return SeededTableInit(base, table, num_embeddings, -bound, bound)
