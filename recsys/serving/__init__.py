"""Serving: the user KV cache, cross-candidate scoring, the batch scoring job (docs/serving.md).

Public API::

    scorer = CachedScorer(model, UserKVCache(max_bytes=512 << 20), candidate_chunk=512)
    logits = scorer.score_batch(batch)          # [sum C_b, T], == model.rank_per_candidate to 1e-5
    scorer.cache.stats.as_dict()                # hits / partial hits / misses / evictions / bytes

    score_in_chunks(model, prefix, ns_tokens, cand_offsets, candidate_chunk)  # stage 2, chunked
    extend_states(model, states, new_rows, new_offsets, new_events)          # stage 1, incremental
    run_scoring(ScoreConfig(...))               # python -m recsys.score (torchrun: one rank of N)

The job: ``job.py`` (driver), ``load.py`` (checkpoint -> model), ``inputs.py``, ``reader.py``, ``modes.py``
(candidates / catalog / cascade; ``cascade.py``: retrieve -> rank), ``ranking.py`` (the one catalog ranking, shared with recsys.evaluate), ``summary.py``,
``group.py`` (torchrun's ranks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from recsys.reliability.lazy_exports import lazy_exports

# Submodule of every public name, imported on first access (PEP 562): an entry point that imports
# this package's config module refuses a bad config before paying for torch / torchrec.
_EXPORTS = {
    "CacheStats": "cache",
    "UserKVCache": "cache",
    "merged_events": "events",
    "CachedScorer": "scorer",
    "score_in_chunks": "scorer",
    "UserKVState": "state",
    "empty_state": "state",
    "extend_states": "state",
    "states_to_prefix": "state",
}

if TYPE_CHECKING:  # static analysers see the eager imports
    from recsys.serving.cache import CacheStats, UserKVCache
    from recsys.serving.events import merged_events
    from recsys.serving.scorer import CachedScorer, score_in_chunks
    from recsys.serving.state import UserKVState, empty_state, extend_states, states_to_prefix


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = [
    "CacheStats",
    "CachedScorer",
    "UserKVCache",
    "UserKVState",
    "empty_state",
    "extend_states",
    "merged_events",
    "score_in_chunks",
    "states_to_prefix",
]
