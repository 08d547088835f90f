"""The training forward and the cached scorer's candidate pass read no size back from a tensor.

Sizes come from the loader as Python ints (``RequestBatch.sizes``); a read-back (``.item()``,
``.tolist()``, ``int(t)``, ...) is a host sync on an accelerator, which stalls the pipeline that
overlaps the next batch's copy / embedding all-to-all with this one's compute. The attention
kernels (``kernels/``) still plan their chunks from host offsets: counted apart, not asserted.
"""

from __future__ import annotations

import pytest
import torch
from feature_helpers import SCHEMA, HostSyncCounter, make_ranker, request_table

from recsys.data.collate import collate
from recsys.data.jagged import keep_last
from recsys.data.validate import validate_table
from recsys.serving.scorer import score_in_chunks

ALLOWED = ("kernels",)  # see the module docstring


def _batch(seed: int = 0, max_len: int = 8):
    return collate(validate_table(request_table(24, seed), SCHEMA, "requests.parquet", 0), SCHEMA, max_len)


def test_counter_sees_every_kind_of_read_back():
    """The guard can fail: each read-back form is counted, and a size-less jagged helper is caught."""
    t = torch.tensor([3, 1])
    with HostSyncCounter() as c:
        int(t[0])
        t.tolist()
        t[1].item()
        bool(t[0])
        keep_last(torch.tensor([0, 5, 5, 7]), 3)  # no total given: reads the offsets back
    assert sum(c.calls.values()) == 5, c.calls


@pytest.mark.parametrize("merge,ns,recent", [("time_interleaved", "auto_split", 0),
                                             ("intent_grouped", "group_wise", 2),
                                             ("time_interleaved", "auto_split", 3)])
def test_training_forward_reads_no_size_back(merge, ns, recent):
    model = make_ranker(seq_merge=merge, ns_tokenizer=ns, ns_recent_events=recent).train()
    batch = _batch()
    with HostSyncCounter() as c:
        logits = model(batch)
    assert logits.shape == (batch.num_candidates, len(SCHEMA.tasks))
    assert c.outside(*ALLOWED) == {}, f"host reads in the forward: {dict(c.calls)}"


@pytest.mark.parametrize("merge", ["time_interleaved", "intent_grouped"])
def test_cached_scorer_candidate_pass_reads_no_size_back(merge):
    """Tokenize + stage 2 against a cached prefix, all candidates in one chunk (``CachedScorer`` below
    ``candidate_chunk``): no read-back at all."""
    model = make_ranker(seq_merge=merge).eval()
    batch = _batch(seed=1)
    with torch.no_grad():
        tok = model.tokenizer(batch)
        prefix = model.encode_prefix(tok.s_tokens, tok.s_offsets, tok.s_lengths)
        with HostSyncCounter() as c:
            tok = model.tokenizer(batch)
            fast = score_in_chunks(model, prefix, tok.ns_tokens, tok.cand_offsets, batch.num_candidates)
        torch.testing.assert_close(fast, model.rank_per_candidate(tok), rtol=1e-5, atol=1e-5)
    assert c.outside(*ALLOWED) == {}, f"host reads in the candidate pass: {dict(c.calls)}"


@pytest.mark.parametrize("merge", ["time_interleaved", "intent_grouped"])
def test_chunked_candidate_pass_reads_offsets_once_per_batch(merge):
    """Chunked stage 2 plans its per-chunk prefix views from host offsets: one read per layer's offsets and
    one of the candidate offsets, per batch; never per chunk (2 and 5 candidates a chunk read the same)."""
    model = make_ranker(seq_merge=merge).eval()
    batch = _batch(seed=1)
    reads = {}
    with torch.no_grad():
        tok = model.tokenizer(batch)
        prefix = model.encode_prefix(tok.s_tokens, tok.s_offsets, tok.s_lengths)
        for chunk in (2, 5):
            with HostSyncCounter() as c:
                fast = score_in_chunks(model, prefix, tok.ns_tokens, tok.cand_offsets, chunk)
            torch.testing.assert_close(fast, model.rank_per_candidate(tok), rtol=1e-5, atol=1e-5)
            reads[chunk] = sum(c.outside(*ALLOWED).values())
    assert reads == {2: len(prefix.offsets) + 1, 5: len(prefix.offsets) + 1}, reads


@pytest.mark.parametrize("search", ["none", "soft", "hard"])
def test_long_history_forward_reads_at_most_the_hard_search_total(search):
    """Memory and soft search read no size back; hard search reads one: how many events matched
    (data-dependent, no loader can know it)."""
    from recsys.longseq.config import LongSeqConfig

    cfg = LongSeqConfig(memory=True, search=search, codebook_size=8, key_dim=8, search_k=3)
    model = make_ranker(long_seq=cfg).train()
    batch = collate(validate_table(request_table(24, 2), SCHEMA, "requests.parquet", 0), SCHEMA, 4, 12)
    with HostSyncCounter() as c:
        model(batch)
    assert sum(c.outside(*ALLOWED).values()) == (1 if search == "hard" else 0), dict(c.calls)
