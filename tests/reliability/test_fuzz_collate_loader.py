"""Fuzz: valid request rows of random schemas (unicode names, empty / length-1 histories, one candidate, huge ids
and times) through validate -> collate, the Parquet loader, and the tokenizer; every batch equals a row-by-row
reference, never a silently different one."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from fuzz_helpers import FUZZ, assert_batch_matches, reference_batch, rows_of, valid_tables
from hypothesis import given
from hypothesis import strategies as st

from recsys.data.collate import collate
from recsys.data.config import LoaderConfig
from recsys.data.loader import RequestLoader
from recsys.data.validate import validate_table
from recsys.features.tokenizer import UnifiedTokenizer
from recsys.model.config import ModelConfig


@FUZZ
@given(valid_tables(), st.integers(1, 7))
def test_fuzz_collate_matches_reference(case, max_len):
    schema, table = case
    checked = validate_table(table, schema, "fuzz.parquet", 0)
    assert checked.num_rows == table.num_rows
    assert_batch_matches(collate(checked, schema, max_len), reference_batch(rows_of(table), schema, max_len), schema)


@FUZZ
@given(valid_tables(max_rows=12), st.integers(1, 5), st.integers(1, 5), st.integers(1, 6), st.booleans())
def test_fuzz_loader_matches_reference(case, row_group_size, batch_size, max_len, drop_last):
    schema, table = case
    rows = rows_of(table)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "part-00000.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        cfg = LoaderConfig(batch_size=batch_size, max_len=max_len, drop_last=drop_last)
        loader = RequestLoader([path], schema, cfg)
        batches = list(loader)
    n_full = len(rows) // batch_size
    assert len(batches) == len(loader) == n_full + (0 if drop_last or len(rows) % batch_size == 0 else 1)
    for k, batch in enumerate(batches):  # one shard, no shuffle: batch k = rows [k*bs, (k+1)*bs)
        assert_batch_matches(batch, reference_batch(rows[k * batch_size:(k + 1) * batch_size], schema, max_len),
                             schema)


@FUZZ
@given(valid_tables(), st.integers(1, 6), st.sampled_from(["time_interleaved", "intent_grouped"]))
def test_fuzz_tokenizer_shapes_and_finiteness(case, max_len, merge):
    schema, table = case
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=1, ffn_mult=1, n_ns_tokens=2, emb_dim=8, head_hidden=8,
                      seq_merge=merge)
    torch.manual_seed(0)
    tok = UnifiedTokenizer(schema, cfg)
    batch = collate(validate_table(table, schema, "fuzz.parquet", 0), schema, max_len)
    with torch.no_grad():
        out = tok(batch)
    ref = reference_batch(rows_of(table), schema, max_len)
    per_request = np.sum([ref[f"{k}.ts.lengths"] for k in schema.sequences], axis=0)
    if merge == "intent_grouped":
        per_request = per_request + len(schema.sequences)  # one [SEP_k] per kind, even for an empty group
    assert torch.diff(out.s_offsets).tolist() == per_request.tolist()
    assert tuple(out.s_tokens.shape) == (int(per_request.sum()), 16)
    assert tuple(out.ns_tokens.shape) == (batch.num_candidates, 2, 16)
    assert out.cand_offsets.tolist() == batch.cand_offsets.tolist()
    assert torch.isfinite(out.s_tokens).all() and torch.isfinite(out.ns_tokens).all()
