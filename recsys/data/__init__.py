"""Data stage: the request-row contract, generators / ingest, and the Parquet loader.

Public entry points::

    prepared = prepare_dataset(cfg.data)                     # cached Parquet dataset
    loader = RequestLoader(prepared.splits["train"], prepared.schema, cfg.data.loader,
                           rank=rank, world_size=world_size, epoch=epoch)
    for batch in loader: ...                                 # RequestBatch
"""

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
