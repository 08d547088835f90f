"""Constrained beam search with the SID decoder: ``SidDecoder`` + its incremental cache as the
``step_logprobs`` of ``recsys.retrieval.beam``.

Shapes: ``R`` requests, ``W`` beam width, ``t`` codes decoded so far, ``V`` codes per level.

The ``W`` beams of request ``r`` are rows ``r*W .. r*W + W - 1`` and that request's candidates
against its shared prefix (``cand_offsets = arange(R + 1) * W``). After every step the search calls
``reorder(parent)`` (``on_select``), which gathers the per-beam cache so that row ``i`` holds the K/V
of its parent's code tokens; the next call then projects only the newest code.
"""

from __future__ import annotations

import torch

from recsys.errors import InputError
from recsys.model.ranker import PrefixKV
from recsys.retrieval.beam import BeamResult, constrained_beam_search
from recsys.retrieval.sid_decoder import SidDecoder
from recsys.retrieval.sid_trie import SidTrie


class CachedStepper:
    """``step_logprobs(prefix_codes [R*W, t]) -> [R*W, V]`` with a decoding cache; ``reorder`` is the hook."""

    def __init__(self, decoder: SidDecoder, prefix: PrefixKV, beam_width: int) -> None:
        self.decoder = decoder
        self.num_requests = prefix.offsets[0].numel() - 1
        offsets = torch.arange(self.num_requests + 1, device=prefix.offsets[0].device) * beam_width
        self.state = decoder.begin(prefix, offsets)

    def __call__(self, prefix_codes: torch.Tensor) -> torch.Tensor:
        t = prefix_codes.shape[1]
        if t != self.state.t:
            raise InputError(f"decoder cache holds {self.state.t} tokens but was asked for step {t}")
        # The cache must be the one of these prefixes (a caller that re-selects beams calls reorder).
        if t > 1 and not torch.equal(self.state.codes, prefix_codes[:, : t - 1].long()):
            raise InputError(f"step {t}: the prefixes do not extend the cached ones; pass reorder as on_select")
        logp, self.state = self.decoder.step(self.state, None if t == 0 else prefix_codes[:, t - 1])
        return logp

    def reorder(self, parent: torch.Tensor) -> None:
        """``parent [R*W]``: row ``i`` of the next step continues row ``parent[i]`` of this one."""
        self.state = self.state.select(parent)


@torch.no_grad()
def sid_beam_search(decoder: SidDecoder, prefix: PrefixKV, trie: SidTrie, beam_width: int) -> BeamResult:
    """Top-``beam_width`` catalog items per request of ``prefix`` (``R`` requests) by the decoder's summed
    code log-probability, constrained to ``trie``; ``certified`` as in ``recsys.retrieval.beam`` (the
    decoder is normalised, so the bound holds)."""
    if trie.depth != decoder.num_levels or trie.vocab_size != decoder.vocab_size:
        raise InputError(f"trie has {trie.depth} levels x {trie.vocab_size} codes, the decoder "
                         f"{decoder.num_levels} x {decoder.vocab_size} (build the trie with "
                         f"vocab_size={decoder.vocab_size} from the codes the decoder was trained on)")
    stepper = CachedStepper(decoder, prefix, beam_width)
    return constrained_beam_search(trie, stepper, stepper.num_requests, beam_width, on_select=stepper.reorder)
