"""The one catalog ranking (``recsys.serving.ranking``) against brute force.

* ``rank_requests`` on random integer scores (many ties), a catalog subset, targets outside it and
  seen items, against a Python sort;
* item 0 (the padding id) is never a target, never seen, never in a candidate set;
* end to end: the scoring job's catalog output and the evaluation report's ranks equal a reference
  that scores every catalog item one by one with the plain (uncached) model and sorts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from job_fixtures import read_output, score_config

from recsys.data.collate import collate
from recsys.data.item_categories import collect_item_categories
from recsys.errors import InputError
from recsys.evaluate.catalog import catalog_ranks
from recsys.serving.catalog import catalog_items, with_candidates
from recsys.serving.config import CatalogTarget
from recsys.serving.job import run_scoring
from recsys.serving.load import load_ranker, resolve_checkpoint
from recsys.serving.partitions import plan_partitions
from recsys.serving.ranking import Catalog, history_items, rank_requests, request_targets
from recsys.serving.reader import PartitionReader
from recsys.testing import random_request_batch, tiny_schema


def brute_ranking(score: dict[int, float], catalog: list[int], targets: set[int], seen: set[int]) -> list[int]:
    """Catalog items minus seen non-targets, best score first, ties by item id."""
    kept = [i for i in catalog if not (i in seen and i not in targets)]
    return sorted(kept, key=lambda i: (-score[i], i))


def test_rank_requests_equal_a_sort_with_ties_subsets_and_seen_items():
    rng = np.random.default_rng(0)
    n = 30
    for trial in range(20):
        items = np.sort(rng.choice(np.arange(1, n), size=rng.integers(1, n - 1), replace=False))
        catalog = Catalog(items, np.zeros_like(items), n)
        b = 4
        scores = torch.as_tensor(rng.integers(0, 4, (b, items.size)).astype(np.float32))  # ties everywhere
        targets = [np.unique(rng.choice(np.arange(1, n), size=rng.integers(0, 4))) for _ in range(b)]
        seen = [np.unique(rng.choice(np.arange(1, n), size=rng.integers(0, n))) for _ in range(b)]
        k = int(rng.integers(1, items.size + 3))  # sometimes more than the items left
        for use_seen in (False, True):
            got = rank_requests(scores, catalog, targets, seen if use_seen else None, k)
            for r, s_b, t_b, seen_b in zip(got, scores, targets, seen):
                score = dict(zip(items.tolist(), s_b.tolist()))
                order = brute_ranking(score, items.tolist(), set(t_b.tolist()), set(seen_b.tolist()) if use_seen
                                      else set())
                assert items[r.top].tolist() == order[:k], (trial, use_seen)
                want = [order.index(t) if t in score else -1 for t in t_b.tolist()]
                assert r.target_rank.tolist() == want and r.targets.tolist() == t_b.tolist()
                assert ((r.target_pos >= 0) == np.isin(t_b, items)).all()


def test_item_0_is_never_a_target_seen_or_ranked(tmp_path):
    schema = tiny_schema()
    batch = random_request_batch(schema, [(3, 2), (0, 1)], [3, 2], seed=1)
    batch.cand.values()[0] = 0  # request 0's first candidate: the padding / unknown id
    batch.seq.values()[0] = 0  # a history event of request 0 with item 0
    batch.labels[:] = 1
    cand = batch.cand["item_id"].values().tolist()
    for r, tgt in enumerate(request_targets(batch, CatalogTarget.positives, 1)):
        listed = cand[int(batch.cand_offsets[r]):int(batch.cand_offsets[r + 1])]
        assert tgt.tolist() == sorted(set(listed) - {0})
    assert all(0 not in h for h in history_items(batch, list(schema.sequences)))
    assert 0 not in catalog_items(schema, None, collect_item_categories([], schema)).items
    pq.write_table(pa.table({"item_id": [0, 3]}), tmp_path / "items.parquet")
    with pytest.raises(InputError, match="padding"):
        catalog_items(schema, str(tmp_path / "items.parquet"), collect_item_categories([], schema))
    with pytest.raises(ValueError):
        Catalog(np.array([0, 3]), np.zeros(2, np.int64), schema.num_items)


@pytest.mark.parametrize("task,target,exclude", [("click", "candidates", False), ("like", "positives", True)])
def test_job_and_evaluate_catalog_ranks_equal_one_by_one_scores(trained, task, target, exclude):
    """The README's catalog figures come from these two paths; both must be the protocol's ranking."""
    tmp, ckpt = trained
    out = tmp / f"catalog-{task}-{target}"
    summary = json.loads(run_scoring(score_config(ckpt, out, mode="catalog", candidate_chunk=100, max_partitions=1,
                                                  **{"catalog.top_k": 5, "catalog.rank_task": task,
                                                     "catalog.target": target,
                                                     "catalog.exclude_history": str(exclude).lower()})).read_text())
    assert summary["rank_task"] == task and "item 0" in summary["protocol"]
    model, schema, _ = load_ranker(resolve_checkpoint(ckpt), torch.device("cpu"))
    batch = collate(PartitionReader(schema).read(plan_partitions(summary["inputs"], 8)[0]), schema, 32)
    cats = collect_item_categories([Path(f) for f in summary["category_files"]], schema).category
    t = list(schema.tasks).index(task)
    items = list(range(1, schema.num_items))
    with torch.no_grad():  # every item alone as every request's only candidate, plain forward: [B, M]
        logits = torch.stack([model(with_candidates(batch, torch.tensor([i]), torch.tensor([cats[i]])))[:, t]
                              for i in items], dim=1)
    cand, labels, off = batch.cand["item_id"].values().tolist(), batch.labels[:, t].tolist(), batch.cand_offsets
    seq, kinds = batch.seq.to_dict(), list(schema.sequences)
    df = read_output(out)
    want_ranks = []
    for b, rid in enumerate(batch.request_id.tolist()):
        lo, hi = int(off[b]), int(off[b + 1])
        targets = {cand[j] for j in range(lo, hi) if target == "candidates" or labels[j] > 0.5} - {0}
        seen = set()
        if exclude:
            for k in kinds:
                o = seq[f"{k}.item_id"].offsets()
                seen |= set(seq[f"{k}.item_id"].values()[o[b]:o[b + 1]].tolist())
        order = brute_ranking(dict(zip(items, logits[b].tolist())), items, targets, seen)
        rows = df.filter(df["request_id"] == rid)
        top = rows.filter(rows["rank"] < 5).sort("rank")
        assert top["item_id"].to_list() == order[:5]
        torch.testing.assert_close(torch.tensor(top[f"score_{task}"].to_numpy()),
                                   torch.sigmoid(logits[b, [i - 1 for i in order[:5]]]), rtol=1e-5, atol=1e-6)
        got = dict(zip(*rows.filter(rows["is_target"]).select("item_id", "rank").to_numpy().T.tolist()))
        assert got == {i: order.index(i) for i in targets}
        want_ranks += [order.index(i) for i in sorted(targets)]
    ranks, n_req = catalog_ranks(model, [batch], catalog_items(schema, None, collect_item_categories(
        [Path(f) for f in summary["category_files"]], schema)), kinds, CatalogTarget(target), exclude, 37,
                                 torch.device("cpu"), rank_task=t)
    assert ranks.tolist() == want_ranks and len(want_ranks) > 0


def test_a_bad_rank_task_is_refused_before_the_output_dir_exists(trained):
    tmp, ckpt = trained
    out = tmp / "bad-rank-task"
    with pytest.raises(InputError, match="catalog.rank_task='nope'"):
        run_scoring(score_config(ckpt, out, mode="catalog", **{"catalog.rank_task": "nope"}))
    assert not out.exists()
