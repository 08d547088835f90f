"""Data stage: the request-row contract, generators / ingest, and the Parquet loader.

Public entry points::

    prepared = prepare_dataset(cfg.data)                     # cached Parquet dataset
    loader = RequestLoader(prepared.splits["train"], prepared.schema, cfg.data.loader,
                           rank=rank, world_size=world_size, epoch=epoch)
    for batch in loader: ...                                 # RequestBatch
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from recsys.reliability.lazy_exports import lazy_exports

# Submodule of every public name, imported on first access (PEP 562): importing one light module
# (``recsys.data.batch`` for the model, ``recsys.data.schema``) must not pull in the ingest stack
# (polars, omegaconf), which an image that only runs the model may not have.
_EXPORTS = {
    "RequestBatch": "batch",
    "DataConfig": "config", "DataSource": "config", "HistoryDist": "config", "LoaderConfig": "config",
    "Ml100kConfig": "config", "OovPolicy": "config", "SyntheticConfig": "config",
    "RequestLoader": "loader",
    "read_schema": "parquet_io",
    "PreparedDataset": "prepare", "as_data_config": "prepare", "prepare_dataset": "prepare",
    "OOV_ID": "schema", "DataSchema": "schema", "SparseFeature": "schema",
    "DataValidationError": "validate", "validate_table": "validate",
}

if TYPE_CHECKING:  # static analysers see the eager imports
    from recsys.data.batch import RequestBatch
    from recsys.data.config import (
        DataConfig,
        DataSource,
        HistoryDist,
        LoaderConfig,
        Ml100kConfig,
        OovPolicy,
        SyntheticConfig,
    )
    from recsys.data.loader import RequestLoader
    from recsys.data.parquet_io import read_schema
    from recsys.data.prepare import PreparedDataset, as_data_config, prepare_dataset
    from recsys.data.schema import OOV_ID, DataSchema, SparseFeature
    from recsys.data.validate import DataValidationError, validate_table


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = [
    "OOV_ID",
    "DataConfig",
    "DataSchema",
    "DataSource",
    "DataValidationError",
    "HistoryDist",
    "LoaderConfig",
    "Ml100kConfig",
    "OovPolicy",
    "PreparedDataset",
    "RequestBatch",
    "RequestLoader",
    "SparseFeature",
    "SyntheticConfig",
    "as_data_config",
    "prepare_dataset",
    "read_schema",
    "validate_table",
]
