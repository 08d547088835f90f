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

A hostile copy of the files (ratings that are not numbers, times in milliseconds, duplicated lines...)
goes through the checks of ``event_input.py`` like any event log: an ``InputError`` names the file, the
column, the row and the value; exact duplicate ratings are dropped and counted
(``IngestResult.counters``, ``duplicate_events_dropped`` in summary.json). The atomic files are read
verbatim (tab-separated, no quoting), as RecBole writes them.
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

from recsys.data.event_input import InputFileNotFound, first_row, numeric_column
from recsys.data.ingest import IngestResult, ingest_event_log
from recsys.errors import InputError

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
            raise InputFileNotFound(f"ml-100k not found under {out}; download it with:\n  {cmd}")
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


def needed_columns(df: pl.DataFrame, path: Path, names: tuple[str, ...]) -> None:
    """An ``InputError`` naming the file and the columns it lacks."""
    missing = [c for c in names if c not in df.columns]
    if missing:
        raise InputError(f"{path} lacks column(s) {missing} (it has {df.columns}); see the RecBole atomic format")


def finite_numbers(df: pl.DataFrame, column: str, path: Path, whole: bool = False) -> pl.Series:
    """A column of numbers (``numeric_column``), finite (and ``whole``: integers), or an ``InputError``
    naming the file, column, row and value."""
    values = numeric_column(df[column], str(path))
    if values.dtype.is_float():
        bad = ~values.is_finite()
        if whole:
            bad = bad | (values != values.round())
        bad = bad.fill_null(False).to_numpy()
        if bad.any():
            i = first_row(bad)
            raise InputError(f"{path}: column {column!r}, row {i}: {df[column][i]!r} is not a finite "
                             f"{'whole ' if whole else ''}number")
    return values


def ml100k_frames(directory: str | Path) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(events, item features, user features) of the ml-100k atomic files, ready for ``ingest_event_log``.

    Ids and times are cast to numbers here (a value that is not one is refused, naming it); their
    normalization, units and range are ``ingest_event_log``'s checks.
    """
    directory = Path(directory)
    inter_path = directory / "ml-100k.inter"
    inter = read_atomic(inter_path)
    needed_columns(inter, inter_path, ("user_id", "item_id", "rating", "timestamp"))
    rating = finite_numbers(inter, "rating", inter_path).cast(pl.Float64)
    events = pl.DataFrame({
        "user_id": numeric_column(inter["user_id"], str(inter_path)),
        "item_id": numeric_column(inter["item_id"], str(inter_path)),
        "timestamp": numeric_column(inter["timestamp"], str(inter_path)),
        "action": rating.cast(pl.Int64), "rating": rating})
    item_path = directory / "ml-100k.item"
    items = read_atomic(item_path)
    needed_columns(items, item_path, ("item_id", "class"))
    items = items.select(
        numeric_column(items["item_id"], str(item_path)),
        pl.col("class").fill_null("").str.split(" ").list.first().alias("category"))
    items = items.with_columns(pl.when(pl.col("category") == "").then(None).otherwise(pl.col("category"))
                               .alias("category"))
    user_path = directory / "ml-100k.user"
    users = read_atomic(user_path)
    needed_columns(users, user_path, ("user_id", "age", "gender", "occupation", "zip_code"))
    age = finite_numbers(users, "age", user_path, whole=True).cast(pl.Int64).to_numpy()
    zip_first = users["zip_code"].str.slice(0, 1)
    users = pl.DataFrame({
        "user_id": numeric_column(users["user_id"], str(user_path)),
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
    """Request rows of the ml-100k CTR protocol (see the module docstring); times are seconds."""
    events, items, users = ml100k_frames(directory)
    cold = held_out_items(events, cold_item_fraction, cold_seed) if cold_item_fraction > 0 else None
    return ingest_event_log(events.with_columns(pl.lit("rating").alias("kind")), item_features=items,
                            user_features=users, task="like", label_column="rating",
                            positive_threshold=float(like_threshold), num_negatives=0, split="leave_one_out",
                            cold_items=cold, timestamp_unit="s", name=str(Path(directory) / "ml-100k.inter"))
