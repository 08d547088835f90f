"""Item -> category from request-row files.

A candidate's NS tokens need its item's category, and request rows carry ``(item_id, category)`` pairs in
the candidate columns and in every behaviour sequence. :func:`collect_item_categories` reads those columns
of the given files and keeps the last category seen per item; an item never seen gets category 0 (the
reserved *unknown* id the tables already have). Used by the scoring job's catalog and by training-time
hard negatives (``recsys.train.hard_negatives``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from recsys.data.parquet_io import open_parquet, read_parquet_table
from recsys.data.schema import DataSchema


@dataclass
class ItemCategories:
    """``category[item_id]`` for ``item_id`` in ``0 .. num_items-1`` (0 = unknown) and how it was found."""

    category: np.ndarray
    """[num_items] int64."""
    seen: np.ndarray
    """[num_items] bool: the item appeared in some file."""
    conflicts: int
    """Items seen with more than one category (the last one seen is kept)."""


def collect_item_categories(files: list[Path], schema: DataSchema) -> ItemCategories:
    """Item -> category from the candidate and behaviour columns of request-row files (see module doc)."""
    n = schema.num_items
    category = np.zeros(n, dtype=np.int64)
    seen = np.zeros(n, dtype=bool)
    conflict = np.zeros(n, dtype=bool)
    pairs = [("cand_item_id", "cand_category")] + [
        (schema.seq_col(k, "item_id"), schema.seq_col(k, "category")) for k in schema.sequences]
    for f in files:
        pf = open_parquet(f)  # a damaged file: an InputError naming it (and the row group), not a pyarrow error
        names = set(pf.schema_arrow.names)
        for item_col, cat_col in pairs:
            if item_col not in names or cat_col not in names:
                continue
            table = read_parquet_table(f, [item_col, cat_col], pf)
            items = pc.list_flatten(table.column(item_col)).to_numpy().astype(np.int64)
            cats = pc.list_flatten(table.column(cat_col)).to_numpy().astype(np.int64)
            ok = (items >= 0) & (items < n) & (cats >= 0) & (cats < schema.num_categories)
            items, cats = items[ok], cats[ok]
            before = category[items]
            conflict[items[seen[items] & (before != cats)]] = True
            category[items] = cats
            seen[items] = True
    return ItemCategories(category, seen, int(conflict.sum()))


__all__ = ["ItemCategories", "collect_item_categories"]
