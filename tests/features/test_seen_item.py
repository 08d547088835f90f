"""The NS tokenizer's "seen" input: is a candidate's item in its request's (loader-truncated) history."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from feature_helpers import SCHEMA, HostSyncCounter, make_ranker, request_table

from recsys.data.collate import collate
from recsys.data.validate import validate_table
from recsys.model.config import ModelConfig


def _batch(table: pa.Table, max_len: int = 8):
    return collate(validate_table(table, SCHEMA, "requests.parquet", 0), SCHEMA, max_len)


def _with_history_candidates(n: int, seed: int) -> pa.Table:
    """Requests whose first candidate is an item of their own history (the newest event of the first kind
    that has one), so both values of the flag occur; the other candidates stay random."""
    table = request_table(n, seed)
    cols = table.to_pydict()
    for r in range(n):
        for k in SCHEMA.sequences:
            hist = cols[SCHEMA.seq_col(k, "item_id")][r]
            if hist:
                cols["cand_item_id"][r][0] = hist[-1]
                break
    return pa.Table.from_pydict(cols, schema=table.schema)


def _reference(batch) -> list[bool]:
    """Per candidate, a Python set membership test over its request's history item ids (every kind)."""
    seq = batch.seq.to_dict()
    hist = [set() for _ in range(batch.num_requests)]
    for k in SCHEMA.sequences:
        jt = seq[f"{k}.item_id"]
        start = 0
        for r, n in enumerate(jt.lengths().tolist()):
            hist[r].update(jt.values()[start:start + n].tolist())
            start += n
    items, off = batch.cand["item_id"].values().tolist(), batch.cand_offsets.tolist()
    return [items[c] in hist[r] for r in range(batch.num_requests) for c in range(off[r], off[r + 1])]


@pytest.mark.parametrize("max_len", [3, 8])
def test_seen_items_match_a_set_membership_reference(max_len):
    """Both values occur; with max_len 3 the loader's truncation decides (an item only in the dropped
    older events is not seen)."""
    model = make_ranker(ns_seen_item=True)
    for seed in range(3):
        batch = _batch(_with_history_candidates(24, seed), max_len)
        got = model.tokenizer.seen_items(batch).tolist()
        assert got == _reference(batch)
        assert any(got) and not all(got)


def test_seen_input_changes_only_the_flagged_candidates_tokens():
    """Turning one unseen candidate into an item of its history changes that candidate's NS tokens, no other's."""
    model = make_ranker(ns_seen_item=True).eval()
    table = request_table(12, 0)
    cols = table.to_pydict()
    base = _batch(table)
    flags = model.tokenizer.seen_items(base).tolist()
    hist = [[i for k in SCHEMA.sequences for i in cols[SCHEMA.seq_col(k, "item_id")][r]] for r in range(12)]
    r = next(r for r in range(12) if hist[r] and not flags[int(base.cand_offsets[r])])
    first = int(base.cand_offsets[r])
    cols["cand_item_id"] = [list(c) for c in cols["cand_item_id"]]
    cols["cand_item_id"][r][0] = hist[r][-1]
    other = _batch(pa.Table.from_pydict(cols, schema=table.schema))
    assert model.tokenizer.seen_items(other).tolist() == [f or i == first for i, f in enumerate(flags)]
    with torch.no_grad():
        a, b = model.tokenizer(base).ns_tokens, model.tokenizer(other).ns_tokens
    changed = (a - b).abs().flatten(1).amax(1) > 0
    assert changed.tolist() == [i == first for i in range(a.shape[0])]


@pytest.mark.parametrize("ns", ["auto_split", "group_wise"])
def test_seen_input_trains_without_host_reads(ns):
    model = make_ranker(ns_seen_item=True, ns_tokenizer=ns).train()
    batch = _batch(_with_history_candidates(24, 0))
    with HostSyncCounter() as c:
        logits = model(batch)
    assert c.outside("kernels") == {}, dict(c.calls)
    logits.sum().backward()
    cand_in = model.tokenizer.ns_cand if ns == "auto_split" else model.tokenizer.ns_groups["cand"][0]
    assert cand_in.in_features == 2 * 8 + 1 and cand_in.weight.grad[:, -1].abs().sum() > 0


def test_off_by_default():
    assert ModelConfig().ns_seen_item is False
    assert make_ranker().tokenizer.ns_cand.in_features == 2 * 8
