"""``mode=cascade``: retrieve (two-tower + SID) -> union -> re-rank, against a slow reference; rows are real,
distinct catalog items; kill + rerun writes every row once. The retriever artifact's refusals (in process and
through the CLI): ``test_cascade_refusals.py`` (a file of its own, so that xdist runs it beside this one)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch
from conftest import CASCADE, cascade_overrides
from job_fixtures import read_output, score_config, synthetic_sids
from test_job import launch

from recsys.data.collate import collate
from recsys.data.item_categories import collect_item_categories
from recsys.retrieval.artifact import load_retriever
from recsys.retrieval.sid_decoder import user_prefix
from recsys.serving.cascade import union_candidates
from recsys.serving.catalog import catalog_items, with_candidates
from recsys.serving.config import CatalogTarget
from recsys.serving.job import run_scoring
from recsys.serving.load import load_ranker
from recsys.serving.partitions import plan_partitions
from recsys.serving.ranking import history_items, request_targets
from recsys.serving.reader import PartitionReader
from recsys.testing import torch_threads

CPU = torch.device("cpu")
K, TOP_N = CASCADE["cascade.retrieve_k"], CASCADE["cascade.top_n"]


def scored_requests(summary: dict, schema) -> pa.Table:
    files = [Path(f) for f in summary["inputs"]]
    reader = PartitionReader(schema)
    return pa.concat_tables([reader.read(p) for p in plan_partitions(files, 10**9)])


def brute_force_retrieval(retrievers: dict[str, Path], schema, catalog, batch) -> list[np.ndarray]:
    """Per retriever ``[B, K]``: two-tower by ``topk(U @ I.T)`` with seen items at -inf; SID by scoring every
    catalog item's SID from scratch (no beam, no cache), top K, then seen items dropped (-1)."""
    items, cats = torch.as_tensor(catalog.items), torch.as_tensor(catalog.cats)
    seen = history_items(batch, list(schema.sequences))
    assert any(h.size == 0 for h in seen), "the split should hold empty histories (the empty-history policies)"
    tt = load_retriever(retrievers["two_tower"], schema, catalog)
    with torch.no_grad():
        s = tt.model.user_vectors(batch) @ tt.model.item_vectors(items, cats).T  # [B, M]
    for b, h in enumerate(seen):
        s[b, torch.as_tensor(catalog.positions(h))] = float("-inf")
    two_tower = items[s.topk(K, dim=1).indices].numpy()
    sid = load_retriever(retrievers["sid"], schema, catalog)
    b, m = batch.num_requests, items.numel()
    codes = synthetic_sids(schema.num_items)[items].repeat(b, 1)  # [B*M, 2]
    with torch.no_grad():
        logp = sid.model(user_prefix(sid.backbone, batch), codes[:, :1], torch.arange(b + 1) * m)  # [B*M, 2, V]
    total = logp.gather(2, codes.unsqueeze(2)).squeeze(2).sum(1).view(b, m)
    best = items[total.topk(K, dim=1).indices].numpy()
    best = np.where([np.isin(best[i], seen[i]) for i in range(b)], -1, best)
    return [two_tower, best]


def own_ranks(lists: list[list[int]], item: int) -> tuple[int, ...]:
    """The item's index in each retriever's returned ids (-1: not returned)."""
    return tuple(lst.index(item) if item in lst else -1 for lst in lists)


def rrf_reference(order: list[int], lists: list[list[int]], item: int, rrf_k: int) -> float:
    """Reciprocal-rank fusion of one item, written out: 1 / (k + 1 + rank) in the ranker's order and in every
    retriever's list that has it."""
    return 1 / (rrf_k + 1 + order.index(item)) + sum(1 / (rrf_k + 1 + lst.index(item)) for lst in lists if item in lst)


def reference_rows(ckpt: Path, retrievers: dict[str, Path], summary: dict, rrf_k: int | None = None,
                   prior: Path | None = None) -> dict[int, list[tuple]]:
    """request_id -> [(item, rank, is_target, retrieved_by, rank_two_tower, rank_sid, score_click, score_like)],
    the slow way: brute-force retrieval, union, every candidate scored alone by the plain (uncached) ranker,
    Python sort; a retriever's own rank = the item's index among that retriever's returned (non -1) ids.
    ``rrf_k``: the final order is the reciprocal-rank fusion of the ranker's order and the retrievers' lists.
    ``prior``: a residual ranker's two-tower artifact; its ``u . v`` of the request alone and the item alone is
    added to each task's logit."""
    model, schema, _ = load_ranker(ckpt, CPU)
    table = scored_requests(summary, schema)
    batch = collate(table, schema, summary["max_len"])
    cats = collect_item_categories([Path(f) for f in summary["category_files"]], schema)
    catalog = catalog_items(schema, None, cats)
    retrieved = brute_force_retrieval(retrievers, schema, catalog, batch)
    towers = load_retriever(prior, schema, catalog).model if prior is not None else None
    names = ["two_tower", "sid"]
    out = {}
    for b in range(batch.num_requests):
        one = collate(table.slice(b, 1), schema, summary["max_len"])
        found = {}
        for j, r in enumerate(retrieved):
            for item in r[b][r[b] >= 0]:
                found.setdefault(int(item), set()).add(names[j])
        scores = {}
        with torch.no_grad():
            for item in found:
                sub = with_candidates(one, torch.tensor([item]), torch.tensor([int(cats.category[item])]))
                logit = model(sub)[0]
                if towers is not None:
                    u = towers.user_vectors(one)[0]
                    logit = logit + u @ towers.item_vectors(torch.tensor([item]), sub.cand["category"].values())[0]
                scores[item] = torch.sigmoid(logit).tolist()
        order = sorted(found, key=lambda i: (-scores[i][0], i))
        lists = [[int(i) for i in r[b] if i >= 0] for r in retrieved]
        if rrf_k is not None:
            fused = {i: rrf_reference(order, lists, i, rrf_k) for i in found}
            order = sorted(found, key=lambda i: (-fused[i], i))

        cand = one.cand["item_id"].values().numpy()
        labels = one.labels[:, 0].numpy()
        targets = sorted({int(i) for i, y in zip(cand, labels) if y > 0.5 and i > 0})
        rows = [(i, r, i in targets, "+".join(n for n in names if n in found[i]), *own_ranks(lists, i), *scores[i])
                for r, i in enumerate(order[:TOP_N])]
        for t in targets:
            if t not in order[:TOP_N]:
                rank = order.index(t) if t in found else -1
                by = "+".join(n for n in names if n in found.get(t, ()))
                rows.append((t, rank, True, by, *own_ranks(lists, t), *(scores[t] if t in found else (float("nan"),) * 2)))
        out[int(one.request_id[0])] = rows
    return out


def test_cascade_rows_equal_the_slow_reference(trained, retrievers, cascade_run):
    tmp, ckpt = trained
    out, summary = cascade_run
    assert summary["complete"] and summary["partitions_total"] >= 4
    assert_rows_match(read_output(out), reference_rows(ckpt, retrievers, summary), summary)


def test_rrf_fusion_rows_equal_the_slow_reference(trained, retrievers, cascade_run):
    """``cascade.fusion=rrf``: the written order is the fused one (the ranker's own scores still written), and
    it differs from the ranker's order on some request (so the test can tell the two apart)."""
    tmp, ckpt = trained
    out = tmp / "cascade_rrf"
    with torch_threads(1):
        summary = json.loads(run_scoring(score_config(ckpt, out, **cascade_overrides(retrievers),
                                                      **{"cascade.fusion": "rrf", "cascade.rrf_k": 2})).read_text())
    got = read_output(out)
    assert summary["fusion"] == "rrf" and "reciprocal-rank fusion (k 2)" in summary["protocol"]
    assert_rows_match(got, reference_rows(ckpt, retrievers, summary, rrf_k=2), summary)
    plain = read_output(cascade_run[0])
    key = ["request_id", "rank"]
    assert not got.filter(pl.col("rank") >= 0).sort(key)["item_id"].equals(
        plain.filter(pl.col("rank") >= 0).sort(key)["item_id"])


def assert_rows_match(got: pl.DataFrame, want: dict[int, list[tuple]], summary: dict) -> None:
    """The written rows == the reference's, and the summary's metrics == the reference rows' own."""
    assert set(got["request_id"].unique().to_list()) == set(want)
    by_request = {}
    for r in got.iter_rows(named=True):
        by_request.setdefault(r["request_id"], []).append(r)
    n_both = 0
    for rid, rows in want.items():
        mine = by_request[rid]
        assert [(r["item_id"], r["rank"], r["is_target"], r["retrieved_by"], r["rank_two_tower"], r["rank_sid"])
                for r in mine] == [w[:6] for w in rows], rid
        s = np.array([(r["score_click"], r["score_like"]) for r in mine], dtype=np.float64)
        np.testing.assert_allclose(s, np.array([w[6:] for w in rows]), rtol=1e-5, atol=1e-6, equal_nan=True)
        n_both += sum(w[3] == "two_tower+sid" for w in rows)
    m = summary["metrics"]
    assert m["targets"] == sum(w[2] for rows in want.values() for w in rows)
    flat = [w for rows in want.values() for w in rows if w[2]]
    assert m[f"recall@{K}_union"] == pytest.approx(np.mean([w[3] != "" for w in flat]))
    assert m[f"recall@{K}_sid"] == pytest.approx(np.mean(["sid" in w[3] for w in flat]))
    for j, name in enumerate(names_of(summary)):  # each retriever alone, from its own ranks
        ranks = np.array([w[4 + j] for w in flat])
        hit = (ranks >= 0) & (ranks < 10)
        assert m[f"hr@10_{name}"] == pytest.approx(hit.mean())
        assert m[f"ndcg@10_{name}"] == pytest.approx(np.where(hit, 1 / np.log2(np.maximum(ranks, 0) + 2), 0).mean())
    assert set(summary["stage_time_s"]) == {"retrieve", "rank", "write"}
    counts = summary["mode_counts"]
    assert counts["candidates_ranked"] == summary["candidates"]
    # 4 level-1 SID prefixes <= the beam width: every beam search was exact, and certified so
    assert counts["sid_beam_certified"] == counts["sid_beam_requests"] == summary["requests"]


def names_of(summary: dict) -> list[str]:
    return [r["kind"] for r in summary["retrievers"]]


def test_written_items_are_real_and_distinct(cascade_run):
    out, summary = cascade_run
    df = read_output(out)
    assert df["item_id"].min() >= 1 and df["item_id"].max() < summary["catalog_items"] + 1
    assert df.select("request_id", "item_id").is_duplicated().sum() == 0
    top = df.filter(df["rank"] >= 0)
    assert (top.group_by("request_id").len()["len"] >= TOP_N).all()  # the top N, plus targets ranked lower
    assert (df.filter(df["rank"] < 0)["retrieved_by"] == "").all()  # rank -1: no retriever found it


def test_union_keeps_provenance_and_a_request_with_no_valid_beam():
    a = np.array([[5, 3, -1], [-1, -1, -1]])  # request 1: no valid result (e.g. every beam excluded)
    b = np.array([[3, 9, 7], [-1, -1, -1]])
    ids, bits = union_candidates([a, b])
    assert ids[0].tolist() == [3, 5, 7, 9] and bits[0].tolist() == [3, 1, 2, 2]
    assert ids[1].size == 0 and bits[1].size == 0


def test_kill_then_rerun_writes_every_row_once(trained, retrievers, cascade_run):
    tmp, ckpt = trained
    base, summary = cascade_run
    out = tmp / "cascade_killed"
    extra = [f"{k}={v}" for k, v in cascade_overrides(retrievers).items()]
    proc = launch(ckpt, out, *extra, "pause_after_partition_s=1.0")
    deadline = time.time() + 180
    while not (out / "part-00000.parquet").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no partition written in time"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("part-*.parquet")))
    assert 1 <= done < summary["partitions_total"]
    proc = launch(ckpt, out, *extra)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    resumed = json.loads(Path(stdout.strip().splitlines()[-1]).read_text())
    assert resumed["complete"] and resumed["partitions_skipped"] == done
    assert read_output(out).equals(read_output(base))  # every row once, bit-identical
    assert resumed["metrics"] == pytest.approx(summary["metrics"])


def test_target_candidates_counts_every_listed_item(trained, retrievers, cascade_run):
    """``cascade.target=candidates`` (leave-one-out next-item data): every listed candidate is a target, whatever
    its label; the default counts only the ranked task's positives, so it finds fewer on the same requests."""
    tmp, ckpt = trained
    _, positives = cascade_run
    out = tmp / "cascade_candidates"
    with torch_threads(1):
        summary = json.loads(run_scoring(score_config(ckpt, out, **cascade_overrides(retrievers),
                                                      **{"cascade.target": "candidates"})).read_text())
    model, schema, _ = load_ranker(ckpt, CPU)
    batch = collate(scored_requests(summary, schema), schema, summary["max_len"])
    listed = request_targets(batch, CatalogTarget.candidates, 0)
    assert summary["metrics"]["targets"] == sum(t.size for t in listed) > positives["metrics"]["targets"]
    assert summary["target"] == "candidates" and positives["target"] == "positives"
    df = read_output(out).filter(pl.col("is_target"))
    got = {rid: sorted(g["item_id"].to_list()) for (rid,), g in df.group_by("request_id")}
    want = {int(r): t.tolist() for r, t in zip(batch.request_id.tolist(), listed) if t.size}
    assert got == want
