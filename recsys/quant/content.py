"""Item content vectors, the quantizer's input: ``(item_ids [N] int64, vectors [N, d] float32)``.

Sources: a user Parquet (``item_id`` + list ``vector``), a trained checkpoint's item table,
item side features (category one-hot; ml-100k: the 19 genre flags + release decade), or the
synthetic generator's planted item content (noisy category centroid + popularity/quality
directions, known only to the generator).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys.data.config import DataConfig, DataSource, SyntheticConfig
from recsys.data.parquet_io import read_parquet_table
from recsys.errors import InputError
from recsys.reliability.checkpoint import load_checkpoint

ITEM_TABLE_KEY = "tokenizer.embeddings.seq_tables.embeddings.item_id_table.weight"


def read_content_parquet(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Parquet with columns ``item_id`` (int) and ``vector`` (list of floats, one length).

    A missing, empty, truncated or corrupted file: an ``InputError`` naming it (``read_parquet_table``)."""
    table = read_parquet_table(path)
    missing = {"item_id", "vector"} - set(table.column_names)
    if missing:
        raise InputError(f"content Parquet {path} lacks column(s) {sorted(missing)} (needs item_id, vector)")
    ids = torch.from_numpy(table["item_id"].to_numpy().astype(np.int64))
    lens = pa.compute.list_value_length(table["vector"]).to_numpy()
    if len(lens) and (lens != lens[0]).any():
        raise InputError(f"content Parquet {path}: vectors have different lengths {sorted(set(lens.tolist()))[:5]}")
    flat = pa.compute.list_flatten(table["vector"]).to_numpy().astype(np.float32)
    vecs = torch.from_numpy(flat).view(len(ids), -1 if len(ids) else 0)
    if len(torch.unique(ids)) != len(ids):
        raise InputError(f"content Parquet {path}: duplicate item_id values")
    if (ids < 1).any():
        raise InputError(f"content Parquet {path}: item ids must be >= 1 (0 is the OOV id)")
    return ids, vecs


def write_content_parquet(path: str | Path, ids: torch.Tensor, vecs: torch.Tensor) -> None:
    arr = pa.FixedSizeListArray.from_arrays(pa.array(vecs.float().flatten().numpy()), vecs.shape[1])
    pq.write_table(pa.table({"item_id": pa.array(ids.numpy()), "vector": arr.cast(pa.list_(pa.float32()))}), path)


def checkpoint_content(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 1.. of a training checkpoint's item embedding table (row 0 is the OOV id): the ranker's, or a
    retriever backbone's (a two-tower's item tower reads that table: collaborative content for SIDs).

    Loaded like every checkpoint (``load_checkpoint``: digest, ``weights_only``): a file that is not a
    torch checkpoint raises ``CheckpointError`` (an ``InputError``) naming it."""
    state = load_checkpoint(path)
    model = state.get("model")
    # The ranker's key, or the same table inside a retriever's backbone (two-tower: "encoder.ranker.<key>").
    keys = [k for k in model if k == ITEM_TABLE_KEY or k.endswith("." + ITEM_TABLE_KEY)] if isinstance(model, dict) else []
    if len(keys) > 1:
        raise InputError(f"checkpoint {path} holds {len(keys)} item id tables ({keys}); give a checkpoint of one model")
    weights = model[keys[0]] if keys else None
    if weights is None:
        raise InputError(f"checkpoint {path} has no item id table ({ITEM_TABLE_KEY}); was it trained with "
                         "model.item_embedding.mode=sid?")
    return torch.arange(1, weights.shape[0]), weights[1:].float()


def synthetic_content(cfg: SyntheticConfig, dim: int, noise: float, w_popularity: float,
                      w_quality: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Planted item content ``[I, dim]``: ``centroid[category] + w_pop * z_pop * u_pop + w_q * quality * u_q
    + noise * eps`` with unit directions ``u``; its own seeded stream (the rows are not touched)."""
    from recsys.data.synthetic import make_world  # the world is cheap to rebuild from the seed

    world = make_world(cfg, np.random.default_rng(np.random.SeedSequence(cfg.seed).spawn(5)[0]))
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed).spawn(7)[6])
    centroids = rng.standard_normal((cfg.num_categories + 1, dim))
    u = rng.standard_normal((2, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    log_pop = np.log(world.item_pop[1:])
    z_pop = (log_pop - log_pop.mean()) / log_pop.std()
    x = (centroids[world.item_category[1:]] + w_popularity * z_pop[:, None] * u[0]
         + w_quality * world.item_quality[1:, None] * u[1] + noise * rng.standard_normal((cfg.num_items, dim)))
    return torch.arange(1, cfg.num_items + 1), torch.from_numpy(x.astype(np.float32))


def ml100k_genre_content(data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """ml-100k: 19-dim genre multi-hot (+ release decade one-hot) per movie; ids = the dataset's ids."""
    from recsys.data.ml100k import ensure_ml100k, read_atomic
    from recsys.data.prepare import ml100k_raw_dir

    items = read_atomic(ensure_ml100k(ml100k_raw_dir(data), data.ml100k.recbole_version, download=data.ml100k.download)
                        / "ml-100k.item")
    ids = items["item_id"].cast(pl.Int64).to_numpy()
    if not np.array_equal(np.sort(ids), np.arange(1, len(ids) + 1)):
        raise InputError("ml-100k item ids are not 1..n; the dataset's dense ids would differ from raw ids")
    genres = items["class"].fill_null("").str.split(" ")
    vocab = sorted({g for gs in genres.to_list() for g in gs if g})
    multi = np.array([[g in set(gs) for g in vocab] for gs in genres.to_list()], dtype=np.float32)
    year = items["release_year"].cast(pl.Float64, strict=False).fill_null(1990.0).to_numpy()
    decades = np.clip(((year - 1920) // 10).astype(np.int64), 0, 7)
    x = np.concatenate([multi, np.eye(8, dtype=np.float32)[decades]], 1)
    return torch.from_numpy(ids), torch.from_numpy(x)


def category_content(num_items: int, item_category: np.ndarray, num_categories: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Category one-hot ``[num_items - 1, num_categories]`` for ids 1..num_items-1."""
    ids = np.arange(1, num_items)
    return torch.from_numpy(ids), torch.from_numpy(np.eye(num_categories, dtype=np.float32)[item_category[ids]])


def side_feature_content(data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Item side features of the configured dataset (see the module docstring)."""
    if data.source == DataSource.ml100k:
        return ml100k_genre_content(data)
    if data.source == DataSource.synthetic:
        from recsys.data.synthetic import make_world
        cfg = data.synthetic
        world = make_world(cfg, np.random.default_rng(np.random.SeedSequence(cfg.seed).spawn(5)[0]))
        return category_content(cfg.num_items + 1, world.item_category, cfg.num_categories + 1)
    raise InputError(f"side_features content is implemented for synthetic and ml100k data, not {data.source.value!r};"
                     " pass a Parquet of vectors (content.source=parquet) instead")
