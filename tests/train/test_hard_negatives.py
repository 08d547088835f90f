"""Training-time hard negatives (``train.hard_negatives``): each request's negatives are real items of the
retriever's own top K (brute force over its towers), never a listed item, labelled 0 beside the listed
labels; the draw is a function of (seed, epoch, batch index), so a resumed run trains on the same batches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny_runs import run_config

from recsys.baselines.factory import max_s_tokens
from recsys.data import prepare_dataset
from recsys.data.item_categories import collect_item_categories
from recsys.data.loader import RequestLoader
from recsys.data.user_items import UserPositives
from recsys.dist.config import OptimConfig
from recsys.dist.strategy import SingleProcess
from recsys.errors import InputError
from recsys.model.heads import multitask_bce
from recsys.retrieval.train_hooks import build_trainable
from recsys.testing import torch_threads
from recsys.train.config import HardNegativesConfig
from recsys.train.hard_negatives import HardNegatives
from recsys.train.loop import train
from recsys.train.step import Trainer

K, NUM = 12, 5


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    """(root, retriever artifact) of a two-tower trained 3 steps on the tiny dataset."""
    root = tmp_path_factory.mktemp("hard")
    with torch_threads(1):
        train(run_config(root, "tt", "model=two_tower", "train.max_steps=3"))
    return root, root / "tt" / "retriever"


def first_batch(root: Path):
    cfg = run_config(root, "unused")
    ds = prepare_dataset(cfg.data, progress=False)
    loader = RequestLoader(ds.splits["train"], ds.schema, cfg.data.loader, time_gap_buckets=cfg.model.time_gap_buckets)
    return ds, next(iter(loader))


def taken_at_or_after(ds, every_listed: bool) -> dict[int, list[tuple[int, int]]]:
    """user -> [(item, request_ts)] of every positive candidate of the train split, read row by row."""
    out: dict[int, list[tuple[int, int]]] = {}
    for f in ds.splits["train"]:
        for row in pq.read_table(f).to_pylist():
            labels = zip(*(row[f"cand_label_{t}"] for t in ds.schema.tasks))
            for item, ys in zip(row["cand_item_id"], labels):
                if every_listed or max(ys) > 0.5:
                    out.setdefault(row["user_id"], []).append((item, row["request_ts"]))
    return out


@pytest.mark.parametrize("exclude, retrieved_only, history_first",
                         [(True, False, False), (False, False, False), (True, True, False), (True, False, True)])
def test_negatives_are_the_retrievers_top_k_minus_the_listed_items(retriever, exclude, retrieved_only, history_first):
    """... and, with ``exclude_user_positives``, minus every item the same user has a positive for at or
    after the request (false negatives); without it some such item is drawn on this data. With
    ``retrieved_only`` a request whose listed items are all outside the top K gets none; with
    ``history_first`` the pool's items of the request's own history are all drawn before any other."""
    root, path = retriever
    ds, batch = first_batch(root)
    cfg = HardNegativesConfig(str(path), K, NUM, "keep", exclude_user_positives=exclude, retrieved_only=retrieved_only,
                              history_first=history_first)
    hard = HardNegatives(cfg, ds.schema, ds.splits["train"], ds.path.resolve(), seed=0, rank=0)
    later = taken_at_or_after(ds, every_listed=False)
    out = hard.augment(batch, epoch=0, index=0)
    model = hard.retriever.model
    items = torch.arange(1, ds.schema.num_items)
    category = collect_item_categories(ds.splits["train"], ds.schema).category
    with torch.no_grad():  # brute force over the retriever's own towers
        scores = model.user_vectors(batch) @ model.item_vectors(items, torch.as_tensor(category[1:])).T
    top = items[scores.topk(K, dim=1).indices].numpy()  # [B, K]
    old, new = batch.cand_offsets.tolist(), out.cand_offsets.tolist()
    old_items, new_items = batch.cand["item_id"].values().numpy(), out.cand["item_id"].values().numpy()
    new_cats = out.cand["category"].values().numpy()
    drawn_any, false_negatives, missed, history_drawn = False, 0, 0, 0
    seq = batch.seq.to_dict()
    for b in range(batch.num_requests):
        listed = old_items[old[b]:old[b + 1]]
        got = new_items[new[b]:new[b + 1]]
        np.testing.assert_array_equal(got[:listed.size], listed)
        torch.testing.assert_close(out.labels[new[b]:new[b] + listed.size], batch.labels[old[b]:old[b + 1]])
        neg = got[listed.size:]
        user, ts = int(batch.user_id[b]), int(batch.request_ts[b])
        future = {i for i, t in later.get(user, []) if t >= ts}
        false_negatives += len(set(neg.tolist()) & future)
        pool = set(top[b].tolist()) - set(listed.tolist()) - (future if exclude else set())
        if retrieved_only and not set(listed.tolist()) & set(top[b].tolist()):
            pool, missed = set(), missed + 1
        assert neg.size == min(NUM, len(pool)) and len(set(neg.tolist())) == neg.size
        assert set(neg.tolist()) <= pool
        own = {int(x) for key, jt in seq.items() if key.endswith(".item_id")
               for x in jt.values()[jt.offsets()[b]:jt.offsets()[b + 1]]} & pool  # the pool's history items
        history_drawn += len(own & set(neg.tolist()))
        if history_first:
            assert len(own & set(neg.tolist())) == min(len(own), neg.size)
        assert (out.labels[new[b] + listed.size:new[b + 1]] == 0).all()
        np.testing.assert_array_equal(new_cats[new[b] + listed.size:new[b + 1]], category[neg])
        drawn_any |= neg.size > 0
    assert drawn_any and (missed > 0) == retrieved_only  # both kinds of request occur on this batch
    assert history_drawn > 0  # the pools hold history items on this batch (so the history_first check bites)
    assert (false_negatives == 0) if exclude else (false_negatives > 0)
    assert out.seq.values().equal(batch.seq.values()) and out.seq.lengths().equal(batch.seq.lengths())  # histories kept
    again = hard.augment(batch, epoch=0, index=0)
    assert again.cand["item_id"].values().equal(out.cand["item_id"].values())  # a function of (epoch, index)
    other = hard.augment(batch, epoch=0, index=1)
    assert not other.cand["item_id"].values().equal(out.cand["item_id"].values())


def test_listed_label_positive_sets_every_task_of_the_listed_items(retriever):
    root, path = retriever
    ds, batch = first_batch(root)
    hard = HardNegatives(HardNegativesConfig(str(path), K, NUM, "positive"), ds.schema, ds.splits["train"],
                         ds.path.resolve(), seed=0, rank=0)
    out = hard.augment(batch, 0, 0)
    listed = torch.isin(out.cand["item_id"].values(), batch.cand["item_id"].values())
    old, new = batch.cand_offsets.tolist(), out.cand_offsets.tolist()
    is_listed = torch.zeros(out.labels.shape[0], dtype=torch.bool)
    for b in range(batch.num_requests):
        is_listed[new[b]:new[b] + old[b + 1] - old[b]] = True
    assert listed[is_listed].all()
    assert (out.labels[is_listed] == 1).all() and (out.labels[~is_listed] == 0).all()


def test_training_with_hard_negatives_resumes_to_the_same_losses(retriever):
    root, path = retriever
    common = ("train.log_every=1", "train.checkpoint_every=3", "train.optim.warmup_steps=2",
              "train.optim.lr_decay=constant", f"train.hard_negatives.retriever={path}",
              f"train.hard_negatives.retrieve_k={K}", f"train.hard_negatives.num={NUM}")
    with torch_threads(1):
        straight = json.loads(train(run_config(root, "a", "train.max_steps=7", *common)).read_text())
        train(run_config(root, "b", "train.max_steps=3", *common))  # "crash" after step 3
        resumed = json.loads(train(run_config(root, "b", "train.max_steps=7", *common)).read_text())
        plain = json.loads(train(run_config(root, "c", "train.max_steps=7", *common[:4])).read_text())
    assert resumed["resumed_from"].endswith("step_3.pt")

    def losses(out: str) -> dict[int, float]:
        rows = [json.loads(x) for x in (root / out / "train_log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    a, b = losses("a"), losses("b")
    for step in range(4, 8):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    # the negatives are trained on: more candidates per step than the plain run's listed ones
    assert straight["train_samples"] > plain["train_samples"]


def test_refusals(retriever, tmp_path):
    root, path = retriever
    ds, _ = first_batch(root)
    with pytest.raises(InputError, match="num <= retrieve_k"):
        HardNegativesConfig(str(path), retrieve_k=3, num=4)
    with pytest.raises(InputError, match="prior=true needs train.hard_negatives.retriever"):
        HardNegativesConfig(None, prior=True)
    with pytest.raises(InputError, match="retrieved_only=true needs train.loss=listwise"):
        run_config(root, "x", f"train.hard_negatives.retriever={path}", "train.hard_negatives.retrieved_only=true")
    with pytest.raises(InputError, match="exceeds the catalog"):
        HardNegatives(HardNegativesConfig(str(path), 10_000, NUM), ds.schema, ds.splits["train"], ds.path, 0, 0)
    other = run_config(tmp_path, "x", "data.synthetic.seed=3", "data.synthetic.num_items=150")
    other_ds = prepare_dataset(other.data, progress=False)
    with pytest.raises(InputError, match="another schema or catalog"):
        HardNegatives(HardNegativesConfig(str(path), K, NUM), other_ds.schema, other_ds.splits["train"],
                      other_ds.path, 0, 0)
    with pytest.raises(InputError, match="does not exist"):
        HardNegatives(HardNegativesConfig(str(tmp_path / "missing"), K, NUM), ds.schema, ds.splits["train"],
                      ds.path, 0, 0)


def test_listwise_loss_ranks_the_listed_items_above_the_hard_negatives(retriever, tmp_path):
    """``train.loss=listwise`` with hard negatives: the logged loss is the softmax loss of the batch (it starts
    near its chance value, far from the BCE's), it falls with training; a retriever is refused the option."""
    root, path = retriever
    common = ("train.log_every=1", "train.optim.lr_decay=constant", f"train.hard_negatives.retriever={path}",
              f"train.hard_negatives.retrieve_k={K}", f"train.hard_negatives.num={NUM}",
              "train.hard_negatives.listed_label=positive", "train.max_steps=30")
    with torch_threads(1):
        train(run_config(root, "lw", "train.loss=listwise", *common))
        train(run_config(root, "bce", *common))
    rows = {out: [json.loads(x) for x in (root / out / "train_log.jsonl").read_text().splitlines()]
            for out in ("lw", "bce")}
    lw = [r["loss"] for r in rows["lw"] if "loss" in r]
    bce = [r["loss"] for r in rows["bce"] if "loss" in r]
    assert len(lw) == 30
    # at initialisation the scores are near-equal: per ranked request and task about log(C_b) >= log 2
    assert lw[0] > math.log(2) and abs(lw[0] - bce[0]) > 0.1
    assert np.mean(lw[-5:]) < 0.95 * np.mean(lw[:5])  # 4.74 -> 4.29 when written
    with pytest.raises(InputError, match="brings its own training loss"), torch_threads(1):
        train(run_config(tmp_path, "tt", "model=two_tower", "train.max_steps=1", "train.loss=listwise"))


def test_prior_is_each_candidates_two_tower_score_and_the_trainer_adds_it(retriever):
    """``prior=true``: every candidate of the augmented batch carries its two-tower score: equal to the score
    the retriever's faiss search returned for it (every negative is in that top K); the trainer's loss is the
    BCE of ``model(batch) + prior`` (written out); the run's checkpoint records the retriever and its digests
    (what the cascade checks)."""
    root, path = retriever
    ds, batch = first_batch(root)
    hard = HardNegatives(HardNegativesConfig(str(path), K, NUM, "positive", prior=True), ds.schema,
                         ds.splits["train"], ds.path.resolve(), seed=0, rank=0)
    out = hard.augment(batch, 0, 0)
    ids, scores = hard.retriever.retrieve(batch, K)
    off, items = out.cand_offsets.tolist(), out.cand["item_id"].values().tolist()
    checked = 0
    for b in range(batch.num_requests):
        found = dict(zip(ids[b].tolist(), scores[b].tolist()))
        for c in range(off[b], off[b + 1]):
            if items[c] in found:
                assert float(out.prior[c]) == pytest.approx(found[items[c]], rel=1e-4, abs=1e-5)
                checked += 1
    assert checked >= batch.num_requests * NUM // 2

    cfg = run_config(root, "unused")
    model = build_trainable(ds.schema, cfg.model, max_s_tokens(ds.schema, cfg.model, cfg.data.loader.max_len), None)
    par = SingleProcess(torch.device("cpu"))
    module, opt = par.wrap(model, OptimConfig(), lambda s: 1.0)
    with torch.no_grad():
        want_loss = float(multitask_bce(module(out) + out.prior[:, None], out.labels)[0])
        plain_loss = float(multitask_bce(module(out), out.labels)[0])
    assert abs(want_loss - plain_loss) > 1e-3  # the prior changes the loss: the check below can tell
    assert Trainer(module, par, opt).step(out).loss == pytest.approx(want_loss, rel=1e-5)

    with torch_threads(1):
        train(run_config(root, "prior", f"train.hard_negatives.retriever={path}", f"train.hard_negatives.retrieve_k={K}",
                         f"train.hard_negatives.num={NUM}", "train.hard_negatives.prior=true", "train.max_steps=2"))
    ckpt = torch.load(max((root / "prior" / "checkpoints").glob("step_*.pt")), weights_only=True)
    rec = ckpt["score_prior"]
    assert Path(rec["retriever"]) == path.resolve() and rec["kind"] == "two_tower"
    assert rec["state_sha256"] == hard.retriever.identity["state_sha256"]


@pytest.mark.parametrize("every_listed", [True, False])
def test_user_positives_match_a_row_by_row_scan(retriever, every_listed):
    """``UserPositives.taken_later`` == the rows read one by one, on queries at, before and after real
    request times (ties count as later), for users with and without positives; no files: nothing."""
    root, _ = retriever
    ds, _ = first_batch(root)
    up = UserPositives(ds.splits["train"], ds.schema, every_listed)
    later = taken_at_or_after(ds, every_listed)
    rng = np.random.default_rng(0)
    items = np.arange(ds.schema.num_items)
    times = sorted({t for pairs in later.values() for _, t in pairs})
    for user in [*rng.choice(list(later), 5, replace=False).tolist(), max(later) + 1]:
        for ts in [times[0] - 1, times[len(times) // 2], times[-1], times[-1] + 1]:
            want = {i for i, t in later.get(user, []) if t >= ts}
            assert set(items[up.taken_later(user, ts, items)].tolist()) == want, (user, ts)
    assert not UserPositives([], ds.schema, every_listed).taken_later(0, 0, items).any()


def test_user_positives_refuse_user_ids_too_large_for_the_keys(retriever, tmp_path):
    root, _ = retriever
    ds, _ = first_batch(root)
    tasks = ds.schema.tasks
    table = pa.table({"user_id": pa.array([2**62], pa.int64()), "request_ts": pa.array([0], pa.int64()),
                      "cand_item_id": pa.array([[1]], pa.list_(pa.int64())),
                      **{f"cand_label_{t}": pa.array([[1.0]], pa.list_(pa.float32())) for t in tasks}})
    pq.write_table(table, tmp_path / "rows.parquet")
    with pytest.raises(InputError, match="too large for"):
        UserPositives([tmp_path / "rows.parquet"], ds.schema, every_listed=True)
