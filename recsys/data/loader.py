"""``RequestLoader``: streams request-row Parquet files as :class:`RequestBatch` es.

Reading is one row group at a time (never a whole file), each validated on read
(:func:`recsys.data.validate.validate_table`, which also gives every row group the contract's exact
Arrow schema, so row groups of different files concatenate) and collated into jagged batches.

Sharding: a *shard* is one (rank, DataLoader worker) pair; there are
``world_size * max(1, num_workers)`` of them, shard id ``rank * workers + worker``.
The row groups of all files, in one global order (permuted by ``seed + epoch`` when
``shuffle``), are dealt round-robin to the shards. When there are fewer row groups
than shards, every row group is cut into ``num_shards`` contiguous row ranges
instead and shard ``s`` reads range ``s`` of each. Either way every row is read by
exactly one shard. Batches never mix shards; each shard's last batch may be partial
(dropped with ``drop_last``), so ranks can see different batch counts when row
groups differ in size.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from recsys.data.batch import RequestBatch
from recsys.data.collate import BatchArrays, collate_arrays
from recsys.data.config import LoaderConfig
from recsys.data.id_features import TIME_GAP_BUCKETS
from recsys.data.parquet_io import open_parquet, read_row_group
from recsys.data.schema import DataSchema
from recsys.data.validate import validate_table
from recsys.errors import InputError


@dataclass(frozen=True)
class ReadUnit:
    """Rows ``start:stop`` of one row group of one file."""

    file: str
    row_group: int
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


def row_group_units(files: list[Path]) -> list[ReadUnit]:
    """Every row group of ``files`` (in file, then row-group order), from the Parquet footers only
    (a damaged footer raises :class:`~recsys.data.validate.DataValidationError` naming the file)."""
    units = []
    for f in files:
        meta = open_parquet(f).metadata
        units += [ReadUnit(str(f), i, 0, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    return [u for u in units if u.num_rows > 0]


def file_key(path: str) -> str:
    """``<parent>/<name>`` of a data file (``train/part-00000.parquet``): what seeds its in-row-group shuffle."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}"


def plan_shards(units: list[ReadUnit], num_shards: int, *, shuffle: bool = False, seed: int = 0) -> list[list[ReadUnit]]:
    """What each of ``num_shards`` shards reads; together exactly every row of ``units``, once."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    order = np.random.default_rng(seed).permutation(len(units)) if shuffle else np.arange(len(units))
    units = [units[i] for i in order]
    if len(units) >= num_shards:
        return [units[s::num_shards] for s in range(num_shards)]
    plan: list[list[ReadUnit]] = [[] for _ in range(num_shards)]
    for u in units:
        bounds = u.start + (np.arange(num_shards + 1) * u.num_rows) // num_shards  # contiguous, balanced
        for s in range(num_shards):
            if bounds[s + 1] > bounds[s]:
                plan[s].append(ReadUnit(u.file, u.row_group, int(bounds[s]), int(bounds[s + 1])))
    return plan


class RequestStream(IterableDataset):
    """The iterable behind :class:`RequestLoader`: one shard's batches (as numpy) per DataLoader worker."""

    def __init__(self, units: list[ReadUnit], schema: DataSchema, cfg: LoaderConfig, *, rank: int,
                 world_size: int, epoch: int, time_gap_buckets: int = TIME_GAP_BUCKETS) -> None:
        super().__init__()
        self.units, self.schema, self.cfg = units, schema, cfg
        self.time_gap_buckets = time_gap_buckets
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.columns = [f.name for f in schema.arrow_schema()]

    def shard_units(self, worker: int, num_workers: int) -> list[ReadUnit]:
        plan = plan_shards(self.units, self.world_size * num_workers, shuffle=self.cfg.shuffle,
                           seed=self.cfg.seed + self.epoch)
        return plan[self.rank * num_workers + worker]

    def read_unit(self, unit: ReadUnit, files: dict[str, pq.ParquetFile]) -> pa.Table:
        """One validated row group (or its row range)."""
        pf = files.get(unit.file)
        if pf is None:
            pf = files[unit.file] = open_parquet(unit.file)
        names = set(pf.schema_arrow.names)
        present = [c for c in self.columns if c in names]
        table = validate_table(read_row_group(pf, unit.file, unit.row_group, present), self.schema, unit.file,
                               unit.row_group)
        if unit.start or unit.stop < table.num_rows:
            table = table.slice(unit.start, unit.num_rows)
        if self.cfg.shuffle:  # seeded by the file's split/name, not its path: the order must not depend on where
            # the dataset lives or how data.root was spelled (relative vs absolute gave other batches)
            rng = np.random.default_rng([self.cfg.seed, self.epoch, zlib.crc32(file_key(unit.file).encode()),
                                         unit.row_group, unit.start])
            table = table.take(rng.permutation(table.num_rows))
        return table

    def __iter__(self) -> Iterator[BatchArrays | InputError]:
        """This shard's batches; a refusal (a damaged file, a row breaking the contract) is yielded as the
        last item, not raised: raised in a DataLoader worker, it would reach the main process with the
        worker's traceback pasted into its message. :class:`RequestLoader` raises it there as it is."""
        try:
            yield from self._batches()
        except InputError as exc:
            yield exc

    def _batches(self) -> Iterator[BatchArrays]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        bs = self.cfg.batch_size
        files: dict[str, pq.ParquetFile] = {}
        pending: list[pa.Table] = []
        n_pending = 0
        for unit in self.shard_units(worker, num_workers):
            table = self.read_unit(unit, files)
            pending.append(table)
            n_pending += table.num_rows
            if n_pending < bs:
                continue
            buf = pa.concat_tables(pending)
            start = 0
            while n_pending - start >= bs:
                yield self._collate(buf.slice(start, bs))
                start += bs
            pending, n_pending = [buf.slice(start)], n_pending - start
        if n_pending and not self.cfg.drop_last:
            yield self._collate(pa.concat_tables(pending))

    def _collate(self, table: pa.Table) -> BatchArrays:
        return collate_arrays(table, self.schema, self.cfg.max_len, self.cfg.long_max_len, self.time_gap_buckets)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # collation is numpy; keep workers from oversubscribing the cores


class RequestLoader:
    """Iterable of :class:`RequestBatch` over request-row Parquet files.

    ``rank`` / ``world_size``: this process's place among data-parallel ranks; each
    sees a disjoint part of the rows (see the module docstring). ``epoch`` reseeds the
    shuffle; :meth:`set_epoch` changes it between passes. ``time_gap_buckets``: the model's
    ``model.time_gap_buckets`` (collation buckets the time gaps; the tokenizer refuses a mismatch).

    Batches are built in the DataLoader workers, id features and sizes included (see
    ``recsys.data.batch``); each is a ``torchrec.streamable.Pipelineable``, so torchrec's train
    pipelines can copy batch ``i+1`` to the device (and, sharded, start its embedding all-to-all)
    while batch ``i`` computes.
    """

    def __init__(self, files: list[Path], schema: DataSchema, cfg: LoaderConfig, *, rank: int = 0,
                 world_size: int = 1, epoch: int = 0, time_gap_buckets: int = TIME_GAP_BUCKETS) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.files = [Path(f) for f in files]
        self.schema, self.cfg = schema, cfg
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.time_gap_buckets = time_gap_buckets
        self.units = row_group_units(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_rows(self) -> int:
        """Requests in all files (all ranks)."""
        return sum(u.num_rows for u in self.units)

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (from the Parquet footers)."""
        nw = max(1, self.cfg.num_workers)
        plan = plan_shards(self.units, self.world_size * nw, shuffle=self.cfg.shuffle, seed=self.cfg.seed + self.epoch)
        total = 0
        for w in range(nw):
            rows = sum(u.num_rows for u in plan[self.rank * nw + w])
            total += rows // self.cfg.batch_size if self.cfg.drop_last else -(-rows // self.cfg.batch_size)
        return total

    def __iter__(self) -> Iterator[RequestBatch]:
        stream = RequestStream(self.units, self.schema, self.cfg, rank=self.rank, world_size=self.world_size,
                               epoch=self.epoch, time_gap_buckets=self.time_gap_buckets)
        # Own generator: DataLoader draws a worker base seed per iteration, which would otherwise advance the
        # global torch RNG and make a resumed training run (that re-creates the loader) diverge from an
        # uninterrupted one (docs/reliability.md). Seeded per epoch: worker seeds are reproducible too.
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch)
        loader = DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers, generator=gen,
                            worker_init_fn=_worker_init if self.cfg.num_workers > 0 else None)
        for arrays in loader:
            if isinstance(arrays, InputError):
                raise arrays
            yield arrays.to_batch()
