"""prepare_dataset: cached, atomic, the summary and schema written beside the data; ml-100k fixture."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
from data_helpers import ML100K_FIXTURE, load_data_config

from recsys.data import RequestLoader, prepare_dataset, read_schema
from recsys.data.config import DataConfig, DataSource


def test_prepare_is_cached_and_complete(tiny_cfg):
    first = prepare_dataset(tiny_cfg, progress=False)
    assert not first.cached and first.path.parent.name == "data" and first.path.name.startswith("synthetic-")
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".tmp")]
    assert read_schema(first.path) == first.schema
    assert set(first.splits) == {"train", "valid", "test"} and all(len(v) == 1 for v in first.splits.values())
    s = json.loads((first.path / "summary.json").read_text())
    assert s == first.summary
    for key in ("requests", "candidates", "users", "positive_rate", "history_length", "oracle_auc_per_split",
                "timings", "splits"):
        assert key in s, key
    assert sum(s["splits"][k]["requests"] for k in ("train", "valid", "test")) == s["requests"]
    assert sum(pq.ParquetFile(f).metadata.num_rows for fs in first.splits.values() for f in fs) == s["requests"]
    mtime = (first.path / "summary.json").stat().st_mtime_ns
    again = prepare_dataset(tiny_cfg, progress=False)
    assert again.cached and again.path == first.path
    assert (again.path / "summary.json").stat().st_mtime_ns == mtime


def test_parquet_source_reads_a_prepared_dir(tiny_cfg):
    built = prepare_dataset(tiny_cfg, progress=False)
    cfg = DataConfig(source=DataSource.parquet, path=str(built.path), oov_policy="oov")
    got = prepare_dataset(cfg, progress=False)
    assert got.splits == built.splits and got.schema.oov_policy == "oov"


def test_ml100k_fixture_end_to_end(tmp_path):
    """The ml100k source on the committed fixture (copied where the raw files would be downloaded)."""
    raw = tmp_path / "raw"
    shutil.copytree(ML100K_FIXTURE, raw / "ml-100k")
    cfg = load_data_config("ml100k", root=str(tmp_path), **{"ml100k.download": False})
    ds = prepare_dataset(cfg, progress=False)
    s = ds.summary
    assert s["users"] == 5 and s["requests"] == 35
    assert s["splits"]["test"]["requests"] == 5 and s["splits"]["valid"]["requests"] == 5
    assert ds.schema.tasks == ["like"] and ds.schema.sequences == ["rating"]
    assert [f.name for f in ds.schema.sparse] == ["age_bucket", "gender", "occupation", "zip_prefix"]
    batches = list(RequestLoader(ds.splits["test"], ds.schema, cfg.loader))
    assert sum(b.num_requests for b in batches) == 5 and all(b.cand_offsets[-1] == b.num_requests for b in batches)


def test_ml100k_missing_without_download_says_what_to_run(tmp_path):
    cfg = load_data_config("ml100k", root=str(tmp_path), **{"ml100k.download": False})
    with pytest.raises(FileNotFoundError, match="pip download"):
        prepare_dataset(cfg, progress=False)


def test_cli_run_prepares_and_streams(tiny_cfg, capsys):
    from recsys.data.__main__ import PrepareConfig, run

    out = run(PrepareConfig(data=tiny_cfg, progress=False))
    printed = capsys.readouterr().out
    assert out["loader_requests"] == prepare_dataset(tiny_cfg, progress=False).summary["splits"]["train"]["requests"]
    assert "oracle AUC" in printed and "requests/s" in printed
