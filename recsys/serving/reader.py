"""Rows of one output partition, validated like the training loader's (``validate_table``).

Rows are read by partition-aligned row ranges rather than through ``RequestLoader`` (which deals row
groups to ranks/workers): a partition must be the same rows in every run, whichever rank scores it.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from recsys.data.schema import DataSchema
from recsys.data.validate import validate_table
from recsys.serving.partitions import Partition


class PartitionReader:
    """Validated rows of a partition (keeps the last row group read: partitions of one row group are adjacent)."""

    def __init__(self, schema: DataSchema) -> None:
        self.schema = schema
        self.columns = [f.name for f in schema.arrow_schema()]
        self._key: tuple[str, int] | None = None
        self._table: pa.Table | None = None

    def read(self, part: Partition) -> pa.Table:
        """Rows ``part.start:part.stop`` of its row group, every schema column present in the file."""
        if self._key != (part.file, part.row_group):
            pf = pq.ParquetFile(part.file)
            present = [c for c in self.columns if c in pf.schema_arrow.names]
            self._table = validate_table(pf.read_row_group(part.row_group, columns=present), self.schema, part.file,
                                         part.row_group)
            self._key = (part.file, part.row_group)
        return self._table.slice(part.start, part.num_rows)
