"""MovieLens-100k, CTR protocol of docs/data.md (and the project's EVALUATION.md).

Source: the copy shipped inside the ``recbole==1.2.1`` wheel
(``recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}``, RecBole's atomic
format: tab-separated, a ``name:type`` header). Nothing else of the wheel is used.

Rows: one request per rating, history = that user's ratings strictly before it
(sequence kind ``rating``: item, first genre, action = the rating 1..5), a single
candidate (the rated item, category = its first genre), task ``like`` = rating >= 4.
User sparse features: age bucket, gender, occupation, zip prefix (first character).
Split: per user by time (ties: file order), last -> test, second-to-last -> valid.

Item cold start (``cold_item_fraction`` > 0): a seeded share of the rated movies is held out. Their
ratings leave every history, every rating of them becomes a test row (history: the user's warm ratings
strictly before it), and the leave-one-out split runs over the other ratings, so no train/valid row
and no history shows a held-out movie. Items are disjoint between training and the cold rows; times are
not (a cold test row may predate the same user's train rows, as in every item hold-out protocol).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import polars as pl

from recsys.data.ingest import IngestResult, ingest_event_log

FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
WHEEL_DIR = "recbole/dataset_example/ml-100k"
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M buckets: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+


def download_command(raw_dir: Path, version: str = "1.2.1") -> str:
    return (f"{sys.executable} -m pip download --no-deps --only-binary=:all: recbole=={version} "
            f"-d {raw_dir}")


def has_ml100k(directory: Path) -> bool:
    return all((Path(directory) / f).is_file() for f in FILES)


def ensure_ml100k(raw_dir: str | Path, version: str = "1.2.1", download: bool = True) -> Path:
    """The directory holding the three ml-100k files, downloading the recbole wheel first if needed.

    Files land in ``<raw_dir>/ml-100k/``; the wheel stays in ``raw_dir`` (git-ignored).
    """
    raw_dir = Path(raw_dir)
    out = raw_dir / "ml-100k"
    if has_ml100k(out):
        return out
    wheels = sorted(raw_dir.glob(f"recbole-{version}-*.whl"))
    if not wheels:
        cmd = download_command(raw_dir, version)
        if not download:
            raise FileNotFoundError(f"ml-100k not found under {out}; download it with:\n  {cmd}")
        raw_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(cmd.split(), capture_output=True, text=True)
        wheels = sorted(raw_dir.glob(f"recbole-{version}-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"downloading ml-100k (the recbole {version} wheel) failed:\n{proc.stderr[-2000:]}\n"
                               f"Run this by hand (needs network access to PyPI), then retry:\n  {cmd}")
    with zipfile.ZipFile(wheels[-1]) as zf, tempfile.TemporaryDirectory(dir=raw_dir) as tmp:
        for name in FILES:
            member = f"{WHEEL_DIR}/{name}"
            with zf.open(member) as src, open(Path(tmp) / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        out.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            (Path(tmp) / name).replace(out / name)
    return out


def read_atomic(path: Path) -> pl.DataFrame:
    """A RecBole atomic file (tab-separated, header ``name:type``) with the ``:type`` suffixes dropped."""
    df = pl.read_csv(path, separator="\t", quote_char=None, infer_schema_length=0)  # all strings
    return df.rename({c: c.split(":")[0] for c in df.columns})


def ml100k_frames(directory: str | Path) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(events, item features, user features) of the ml-100k atomic files, ready for ``ingest_event_log``."""
    directory = Path(directory)
    inter = read_atomic(directory / "ml-100k.inter")
    events = inter.select(
        pl.col("user_id").cast(pl.Int64), pl.col("item_id").cast(pl.Int64),
        pl.col("timestamp").cast(pl.Float64).cast(pl.Int64),
        pl.col("rating").cast(pl.Float64).cast(pl.Int64).alias("action"),
        pl.col("rating").cast(pl.Float64).alias("rating"))
    items = read_atomic(directory / "ml-100k.item").select(
        pl.col("item_id").cast(pl.Int64),
        pl.col("class").fill_null("").str.split(" ").list.first().alias("category"))
    items = items.with_columns(pl.when(pl.col("category") == "").then(None).otherwise(pl.col("category"))
                               .alias("category"))
    users = read_atomic(directory / "ml-100k.user")
    age = users["age"].cast(pl.Int64).to_numpy()
    zip_first = users["zip_code"].str.slice(0, 1)
    users = pl.DataFrame({
        "user_id": users["user_id"].cast(pl.Int64),
        "age_bucket": np.searchsorted(np.asarray(AGE_EDGES), age, side="right").astype(np.int64),
        "gender": users["gender"],
        "occupation": users["occupation"],
        "zip_prefix": pl.Series(np.where(zip_first.str.contains("^[0-9]$").to_numpy(), zip_first.to_numpy(),
                                         "other")),
    })
    return events, items, users


def held_out_items(events: pl.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """``round(fraction * n)`` raw ids drawn uniformly (seeded) from the n items rated at least once, sorted."""
    rated = np.unique(events["item_id"].to_numpy())
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1CE]))
    return np.sort(rng.choice(rated, size=int(round(fraction * len(rated))), replace=False))


def ingest_ml100k(directory: str | Path, like_threshold: int = 4, cold_item_fraction: float = 0.0,
                  cold_seed: int = 0) -> IngestResult:
    """Request rows of the ml-100k CTR protocol (see the module docstring)."""
    events, items, users = ml100k_frames(directory)
    cold = held_out_items(events, cold_item_fraction, cold_seed) if cold_item_fraction > 0 else None
    return ingest_event_log(events.with_columns(pl.lit("rating").alias("kind")), item_features=items,
                            user_features=users, task="like", label_column="rating",
                            positive_threshold=float(like_threshold), num_negatives=0, split="leave_one_out",
                            cold_items=cold)
