"""Cached scoring of request batches: stage 1 once per user (reused across requests), stage 2 in
candidate chunks.

Shape legend: ``B`` requests, ``C_b`` candidates of request b, ``N`` NS tokens, ``D`` width,
``T`` tasks.

Flow of :meth:`CachedScorer.score_batch`:

1. tokenize the batch (S tokens of the full, loader-truncated histories + NS tokens);
2. for every request, look its user up in the :class:`UserKVCache` with the event identities
   (``recsys.serving.events``): hit -> reuse, append -> extend the cached state with the new
   positions only, miss -> compute from an empty state. Requests of one user that occur
   several times in a batch are processed in *waves* (wave k = k-th occurrence), so the second
   request already finds the first one's state;
3. concatenate the states into a batch ``PrefixKV`` and score candidates in chunks of
   ``candidate_chunk`` rows (:func:`score_in_chunks`): every chunk attends to the shared prefix
   in place, so memory grows with the chunk, never with ``C x L``.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import replace

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import RequestBatch
from recsys.data.jagged import lengths_to_offsets
from recsys.features.tokenizer import TokenizedBatch
from recsys.longseq.cache import LongMemoryCache
from recsys.model.ranker import OneTransRanker, PrefixKV
from recsys.serving.cache import UserKVCache
from recsys.serving.events import merged_events
from recsys.serving.state import UserKVState, empty_state, extend_states, states_to_prefix


def _requests_slice(prefix: PrefixKV, host_offsets: list[list[int]], b0: int, b1: int) -> PrefixKV:
    """Requests ``[b0, b1)`` of ``prefix``: views of their contiguous K/V rows, offsets rebased (no copy)."""
    keys, values, offsets = [], [], []
    for layer, po in enumerate(host_offsets):
        keys.append(prefix.keys[layer][po[b0]:po[b1]])
        values.append(prefix.values[layer][po[b0]:po[b1]])
        offsets.append(prefix.offsets[layer][b0:b1 + 1] - po[b0])
    return PrefixKV(keys, values, offsets)


@torch.no_grad()
def score_in_chunks(model: OneTransRanker, prefix: PrefixKV, ns_tokens: torch.Tensor, cand_offsets: torch.Tensor,
                    candidate_chunk: int) -> torch.Tensor:
    """Stage 2 over candidate rows ``[c0, c0 + candidate_chunk)`` at a time -> logits ``[sum C_b, T]``.

    A chunk sees only the requests its candidates belong to (requests are contiguous, so their prefix
    rows are a view, never a copy): the attention op plans over those few requests, not the batch's.
    """
    if candidate_chunk < 1:
        raise ValueError(f"candidate_chunk must be >= 1, got {candidate_chunk}")
    total = ns_tokens.shape[0]
    if total <= candidate_chunk:
        return model.score_candidates(prefix, ns_tokens, cand_offsets)
    host = [o.tolist() for o in prefix.offsets]  # one host read per batch, not per chunk and layer
    co = cand_offsets.tolist()
    out = []
    for c0 in range(0, total, candidate_chunk):
        c1 = min(total, c0 + candidate_chunk)
        b0 = bisect.bisect_right(co, c0) - 1  # request of candidate c0 (skips requests with no candidate)
        b1 = bisect.bisect_left(co, c1)  # one past the request of candidate c1 - 1
        offs = cand_offsets[b0:b1 + 1].clamp(c0, c1) - c0  # [b1 - b0 + 1]
        out.append(model.score_candidates(_requests_slice(prefix, host, b0, b1), ns_tokens[c0:c1], offs))
    return torch.cat(out)


def slice_candidates(batch: RequestBatch, c0: int, c1: int) -> RequestBatch:
    """The batch with only candidate rows ``[c0, c1)``: every request keeps its history, some keep no candidate."""
    offs = batch.cand_offsets.clamp(c0, c1) - c0  # [B+1]
    lengths = offs[1:] - offs[:-1]
    cand = batch.cand.to_dict()
    keys = list(batch.cand.keys())
    kjt = KeyedJaggedTensor(keys=keys, values=torch.cat([cand[k].values()[c0:c1] for k in keys]),
                            lengths=torch.cat([lengths] * len(keys)))
    return replace(batch, cand=kjt, cand_offsets=offs, labels=batch.labels[c0:c1],
                   true_prob=None if batch.true_prob is None else batch.true_prob[c0:c1])


def occurrence_waves(user_ids: list[int]) -> list[list[int]]:
    """Request indices grouped so that a user appears at most once per wave, in batch order.

    ``[5, 7, 5, 5]`` -> ``[[0, 1], [2], [3]]``.
    """
    seen: Counter[int] = Counter()
    waves: list[list[int]] = []
    for i, u in enumerate(user_ids):
        k = seen[u]
        seen[u] += 1
        if k == len(waves):
            waves.append([])
        waves[k].append(i)
    return waves


class CachedScorer:
    """Scores :class:`RequestBatch` es with a user-level KV cache and chunked stage 2.

    ``cache=None`` disables cross-request reuse (stage 1 is still computed once per request and
    shared by all its candidates).
    """

    def __init__(self, model: OneTransRanker, cache: UserKVCache | None, candidate_chunk: int = 512,
                 tokenize_chunk: int = 4096, memory_cache: LongMemoryCache | None = None) -> None:
        if candidate_chunk < 1 or tokenize_chunk < 1:
            raise ValueError(f"candidate_chunk and tokenize_chunk must be >= 1, got {candidate_chunk}, {tokenize_chunk}")
        self.model = model.eval()
        self.cache = cache
        self.candidate_chunk = candidate_chunk
        self.tokenize_chunk = tokenize_chunk
        """Most candidate rows tokenized at once: bounds the NS tokens ``[C, N, D]`` of a batch (docs/reliability.md)."""
        self.kinds = list(model.tokenizer.kinds)
        self.seq_merge = model.cfg.seq_merge
        self.memory_cache = memory_cache
        """``model.long_seq.memory``: per-user VQ memory states extended in O(new events) (else rebuilt per batch)."""

    @torch.no_grad()
    def user_states(self, batch: RequestBatch, tok: TokenizedBatch) -> list[UserKVState]:
        """Stage 1 for every request of the batch through the cache: one state per request."""
        values, offsets = merged_events(batch, self.kinds, self.seq_merge)
        s_off = tok.s_offsets.tolist()
        if [s_off[i + 1] - s_off[i] for i in range(len(s_off) - 1)] != np.diff(offsets).tolist():
            raise AssertionError("event identities and S tokens disagree in length (tokenizer merge changed?)")
        # copies: a cache entry must not keep the whole batch's array alive (its nbytes counts its own rows)
        events = [values[offsets[i]:offsets[i + 1]].copy() for i in range(batch.num_requests)]
        users = batch.user_id.tolist()
        device, dtype = tok.s_tokens.device, tok.s_tokens.dtype
        out: list[UserKVState | None] = [None] * batch.num_requests
        for wave in occurrence_waves(users):
            jobs, bases = [], []
            for i in wave:
                status, entry = ("miss", None) if self.cache is None else self.cache.lookup(users[i], events[i])
                if status == "hit":
                    out[i] = entry
                    continue
                jobs.append(i)
                bases.append(entry if status == "append" else empty_state(self.model, device, dtype))
            if not jobs:
                continue
            rows, lens = [], []
            for i, base in zip(jobs, bases):
                rows.append(tok.s_tokens[s_off[i] + base.length:s_off[i + 1]])  # the new positions only
                lens.append(rows[-1].shape[0])
            new_off = lengths_to_offsets(torch.tensor(lens, dtype=torch.int64, device=device))
            new_states = extend_states(self.model, bases, torch.cat(rows), new_off, [events[i] for i in jobs])
            for i, st in zip(jobs, new_states):
                out[i] = st
                if self.cache is not None:
                    self.cache.put(users[i], st)
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def score_tokens(self, batch: RequestBatch, tok: TokenizedBatch) -> torch.Tensor:
        """Logits ``[sum C_b, T]`` of an already tokenized batch."""
        prefix = states_to_prefix(self.user_states(batch, tok))
        return score_in_chunks(self.model, prefix, tok.ns_tokens, tok.cand_offsets, self.candidate_chunk)

    @torch.no_grad()
    def score_batch(self, batch: RequestBatch) -> torch.Tensor:
        """Logits ``[sum C_b, T]``; equal to ``model(batch)`` to float tolerance.

        More than ``tokenize_chunk`` candidates: NS tokens are built ``tokenize_chunk`` rows at a time
        (:func:`slice_candidates`) against one stage-1 prefix, so memory does not grow with ``C x N x D``.
        """
        memory = None if self.memory_cache is None else self.memory_cache.states(self.model.tokenizer, batch)
        if batch.num_candidates <= self.tokenize_chunk:
            return self.score_tokens(batch, self.model.tokenizer(batch, memory=memory))
        out, prefix = [], None
        for c0 in range(0, batch.num_candidates, self.tokenize_chunk):
            sub = slice_candidates(batch, c0, min(batch.num_candidates, c0 + self.tokenize_chunk))
            tok = self.model.tokenizer(sub, memory=memory)
            if prefix is None:  # stage 1 (and its cache lookups) once per batch
                prefix = states_to_prefix(self.user_states(sub, tok))
            out.append(score_in_chunks(self.model, prefix, tok.ns_tokens, tok.cand_offsets, self.candidate_chunk))
        return torch.cat(out)
