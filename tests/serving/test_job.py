"""`python -m recsys.score`: partitions, kill -9 + resume, idempotent reruns, catalog mode, config checks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from cli_runner import CliProcess, launch_cli
from hydra import compose, initialize_config_dir
from job_fixtures import CONFIGS, SETTINGS, read_output, score_config
from omegaconf import OmegaConf

from recsys.data.collate import collate
from recsys.data.item_categories import collect_item_categories
from recsys.errors import InputError
from recsys.serving.catalog import with_candidates
from recsys.serving.job import run_scoring
from recsys.serving.load import load_ranker, resolve_checkpoint
from recsys.serving.partitions import plan_partitions
from recsys.serving.reader import PartitionReader


def launch(ckpt: Path, out: Path, *extra: str) -> CliProcess:
    """``python -m recsys.score`` in a child process (``cli_runner``)."""
    return launch_cli("recsys.score", f"checkpoint={ckpt}", f"output_dir={out}", *SETTINGS, *extra)


def test_kill_9_then_resume_gives_the_uninterrupted_output(trained, baseline):
    tmp, ckpt = trained
    base, summary = baseline
    n_parts = summary["partitions_total"]
    assert summary["complete"] and n_parts >= 4 and summary["partitions_written"] == n_parts

    out = tmp / "killed"
    proc = launch(ckpt, out, "pause_after_partition_s=1.0")
    deadline = time.time() + 180
    while not (out / "part-00000.parquet").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no partition written in time"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in out.glob("part-*.parquet"))
    assert 1 <= len(done) < n_parts, done  # really interrupted mid-way
    (out / ".part-00003.parquet.tmp-424242").write_bytes(b"half a file")  # what a kill mid-write leaves

    proc = launch(ckpt, out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    path = Path(stdout.strip().splitlines()[-1])  # the summary path is the last line
    resumed = json.loads(path.read_text())
    assert resumed["complete"] and resumed["partitions_skipped"] == len(done)
    assert resumed["partitions_written"] == n_parts - len(done)
    assert not list(out.glob(".*tmp*"))

    got, want = read_output(out), read_output(base)
    assert got.equals(want)  # bit-identical scores, same rows, same order
    # every (request_id, item_id) of the input exactly as often as it is listed there (no duplicates, no gaps)
    inputs = resumed["inputs"]
    src = pl.read_parquet(inputs).select("request_id", pl.col("cand_item_id").alias("item_id")).explode("item_id")
    count = lambda df: df.group_by("request_id", "item_id").len().sort("request_id", "item_id")  # noqa: E731
    assert count(got.select("request_id", "item_id")).equals(count(src))
    assert resumed["metrics"] == pytest.approx(summary["metrics"], rel=1e-12)  # gauc sums in polars group order


def test_rerun_is_a_no_op_and_other_jobs_are_refused(trained, baseline):
    tmp, ckpt = trained
    out = tmp / "idempotent"
    shutil.copytree(baseline[0], out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    again = json.loads(run_scoring(score_config(ckpt, out)).read_text())
    assert again["complete"] and again["partitions_written"] == 0 and again["requests"] == 0
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert again["metrics"] == pytest.approx(baseline[1]["metrics"], rel=1e-12)
    with pytest.raises(InputError, match="different scoring job"):
        run_scoring(score_config(ckpt, out, candidate_chunk=7))
    partial = json.loads(run_scoring(score_config(ckpt, out, candidate_chunk=7, overwrite="true",
                                                  max_partitions=1)).read_text())
    assert len(list(out.glob("part-*.parquet"))) == 1 and not partial["complete"]


def test_cache_off_matches_cache_on(trained, baseline):
    tmp, ckpt = trained
    on = baseline[1]
    off = json.loads(run_scoring(score_config(ckpt, tmp / "off", **{"cache.enabled": "false"})).read_text())
    assert on["cache"]["lookups"] == on["requests"] and on["cache"]["hits"] > 0 and off["cache_hit_rate"] is None
    a, b = read_output(baseline[0]), read_output(tmp / "off")
    assert a.select("request_id", "item_id").equals(b.select("request_id", "item_id"))
    for c in [c for c in a.columns if c.startswith("score_")]:
        np.testing.assert_allclose(a[c].to_numpy(), b[c].to_numpy(), rtol=1e-5, atol=1e-6)


def test_catalog_mode_top_k_and_ranks(trained):
    tmp, ckpt = trained
    out = tmp / "catalog"
    summary = json.loads(run_scoring(score_config(ckpt, out, mode="catalog", candidate_chunk=100,
                                                  **{"catalog.top_k": 5})).read_text())
    assert summary["catalog_items"] == 200 and summary["seen_items_in_candidate_set"] is True
    assert 0 < summary["category_coverage"] <= 1
    df = read_output(out)
    top = df.filter(pl.col("rank") < 5)
    assert top.group_by("request_id").len()["len"].to_list() == [5] * top["request_id"].n_unique()
    m = summary["metrics"]
    targets = df.filter(pl.col("is_target"))
    ranks = targets["rank"].to_numpy()
    assert m["targets"] == len(ranks) and m["hr@10"] == pytest.approx(float((ranks < 10).mean()))

    # brute force for the first partition: every catalog item as a candidate, uncached model.rank
    model, schema, _ = load_ranker(resolve_checkpoint(ckpt), torch.device("cpu"))
    part = plan_partitions(summary["inputs"], 8)[0]
    batch = collate(PartitionReader(schema).read(part), schema, 32)
    items = torch.arange(1, schema.num_items)
    # The job's item -> category map reads candidate AND behaviour columns; an item seen only in
    # histories has a real category there, so the brute force must use the same map.
    cats = torch.as_tensor(collect_item_categories([Path(f) for f in summary["category_files"]], schema).category[1:])
    with torch.no_grad():
        probs = torch.sigmoid(model(with_candidates(batch, items, cats))).view(batch.num_requests, -1, 2)
    first = pl.read_parquet(out / "part-00000.parquet")
    for b, rid in enumerate(batch.request_id.tolist()):
        rows = first.filter((pl.col("request_id") == rid) & (pl.col("rank") < 5)).sort("rank")
        order = torch.sort(probs[b, :, 0], descending=True, stable=True).indices[:5]
        assert rows["item_id"].to_list() == (order + 1).tolist()
        torch.testing.assert_close(torch.tensor(rows["score_click"].to_numpy()), probs[b, order, 0], rtol=1e-5,
                                   atol=1e-6)


def test_catalog_exclude_history(trained):
    tmp, ckpt = trained
    out = tmp / "catalog_excl"
    summary = json.loads(run_scoring(score_config(ckpt, out, mode="catalog", candidate_chunk=100, max_partitions=1,
                                                  **{"catalog.top_k": 20, "catalog.exclude_history": "true"})
                                     ).read_text())
    assert summary["seen_items_in_candidate_set"] is False and "excluded" in summary["protocol"]
    model, schema, _ = load_ranker(resolve_checkpoint(ckpt), torch.device("cpu"))
    batch = collate(PartitionReader(schema).read(plan_partitions(summary["inputs"], 8)[0]), schema, 32)
    df = read_output(out)
    seq = batch.seq.to_dict()
    for b, rid in enumerate(batch.request_id.tolist()):
        hist = set()
        for k in schema.sequences:
            jt = seq[f"{k}.item_id"]
            o = jt.offsets()
            hist |= set(jt.values()[o[b]:o[b + 1]].tolist())
        rows = df.filter(pl.col("request_id") == rid)
        top = rows.filter((pl.col("rank") < 20) & ~pl.col("is_target"))["item_id"].to_list()
        assert not hist & set(top)


def test_config_typos_fail_at_startup():
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigKeyError, ValidationError

    for override, err in (("cache.max_byte=1", (ConfigCompositionException, ConfigKeyError)),
                          ("mode=catalogue", (ConfigCompositionException, ValidationError)),
                          ("catalog.target=all", (ConfigCompositionException, ValidationError))):
        with pytest.raises(err):
            with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
                compose("score", overrides=["checkpoint=x", "output_dir=y", override])
    with pytest.raises(ValueError):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            OmegaConf.to_object(compose("score", overrides=["checkpoint=x", "output_dir=y", "batch_size=0"]))
