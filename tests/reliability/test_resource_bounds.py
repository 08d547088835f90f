"""Scoring memory is bounded by chunk sizes, not by candidates per request or history length; the user KV
cache never holds more bytes than its bound, counting real tensor storage."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from recsys.data.collate import collate
from recsys.data.schema import DataSchema
from recsys.model.config import ModelConfig, PyramidConfig
from recsys.model.ranker import OneTransRanker
from recsys.serving.cache import UserKVCache
from recsys.serving.scorer import CachedScorer
from recsys.testing import tiny_schema

SCHEMA = tiny_schema()
MAX_LEN = 12


def make_model(pyramid: str = "none") -> OneTransRanker:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=2, ffn_mult=2, n_ns_tokens=3, emb_dim=8, head_hidden=16,
                      pyramid=PyramidConfig(mode=pyramid), attention_backend="torch")
    return OneTransRanker(SCHEMA, cfg, max_s_tokens=len(SCHEMA.sequences) * MAX_LEN).eval()


def table(rng: np.random.Generator, schema: DataSchema, hist: list[int], cands: list[int], users: list[int],
          t0: int = 10**6) -> pa.Table:
    """One row per request: ``hist[r]`` events per kind, ``cands[r]`` candidates."""
    n = len(hist)
    data: dict[str, list] = {"request_id": list(range(n)), "user_id": users, "request_ts": [t0 + 10**7] * n}
    for f in schema.sparse:
        data[f.name] = rng.integers(1, f.num_embeddings, n).tolist()
    for d in schema.dense:
        data[d] = rng.normal(size=n).tolist()
    for k in schema.sequences:
        data[schema.seq_col(k, "ts")] = [sorted(rng.integers(t0, t0 + 10**6, h).tolist()) for h in hist]
        for fld in ("item_id", "category", "action"):
            data[schema.seq_col(k, fld)] = [rng.integers(1, schema.table_size(fld), h).tolist() for h in hist]
    data["cand_item_id"] = [rng.integers(1, schema.num_items, c).tolist() for c in cands]
    data["cand_category"] = [rng.integers(1, schema.num_categories, c).tolist() for c in cands]
    for t in schema.tasks:
        data[f"cand_label_{t}"] = [rng.integers(0, 2, c).astype(float).tolist() for c in cands]
    return pa.Table.from_pydict(data, schema=schema.arrow_schema())


class Recorder:
    """Largest tensors the scorer builds: NS rows per tokenizer call, S tokens per request, rows per stage-2 call."""

    def __init__(self, model: OneTransRanker, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ns_rows, self.s_per_request, self.stage2_rows = 0, 0, 0
        tok_forward, score = model.tokenizer.forward, model.score_candidates

        def tokenize(batch, *a, **kw):
            out = tok_forward(batch, *a, **kw)
            self.ns_rows = max(self.ns_rows, out.ns_tokens.shape[0])
            self.s_per_request = max(self.s_per_request, int(torch.diff(out.s_offsets).max()))
            return out

        def stage2(prefix, ns_tokens, cand_offsets):
            self.stage2_rows = max(self.stage2_rows, ns_tokens.shape[0])
            return score(prefix, ns_tokens, cand_offsets)

        monkeypatch.setattr(model.tokenizer, "forward", tokenize)
        monkeypatch.setattr(model, "score_candidates", stage2)


@pytest.mark.parametrize("cands", [[1], [1500, 1, 700]])
def test_huge_history_and_many_candidates_stay_within_chunks(cands, monkeypatch):
    rng = np.random.default_rng(0)
    hist = [5000] + [0, 1][: len(cands) - 1]  # a user with a huge history, an empty one, a length-1 one
    batch = collate(table(rng, SCHEMA, hist, cands, list(range(len(cands)))), SCHEMA, MAX_LEN)
    model = make_model()
    with torch.no_grad():
        want = model(batch)  # the plain model on the same (truncated) batch
    rec = Recorder(model, monkeypatch)
    scorer = CachedScorer(model, UserKVCache(10**7), candidate_chunk=64, tokenize_chunk=256)
    got = scorer.score_batch(batch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert rec.s_per_request <= len(SCHEMA.sequences) * MAX_LEN  # history cut to max_len per kind
    assert rec.ns_rows <= 256 and rec.stage2_rows <= 64  # never C x N x D at once
    assert scorer.cache.stats.lookups == len(cands)  # stage 1 once per request, not once per slice


def storage_bytes(entry) -> int:
    """Bytes really held: each distinct tensor storage once, plus the event array."""
    seen, total = set(), int(entry.events.nbytes)
    for t in [*entry.keys, *entry.values, *(x for x in entry.inputs if x is not None)]:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


@pytest.mark.parametrize("pyramid", ["none", "linear"])
def test_cache_never_exceeds_its_byte_bound(pyramid):
    rng = np.random.default_rng(1)
    model = make_model(pyramid)
    bound = 15_000  # a few users' states (each <= 2 kinds x 12 events x 2 layers of K/V)
    cache = UserKVCache(bound)
    scorer = CachedScorer(model, cache, candidate_chunk=16)
    n_users = 12
    for _ in range(8):
        users = rng.integers(0, n_users, 6).tolist()
        hist = rng.integers(0, 20, len(users)).tolist()  # random histories: misses, inserts, evictions
        batch = collate(table(rng, SCHEMA, hist, rng.integers(1, 5, len(users)).tolist(), users), SCHEMA, MAX_LEN)
        scorer.score_batch(batch)
        held = [cache.peek(u) for u in range(n_users) if u in cache]
        assert cache.stats.bytes == sum(e.nbytes for e in held) <= bound
        assert sum(storage_bytes(e) for e in held) <= bound  # nbytes is honest: no view pins a bigger buffer
        assert cache.stats.peak_bytes <= bound
    assert cache.stats.evictions > 0 and cache.stats.inserts > 0
