"""Pyramid stacking: how many S-token queries each layer keeps, and what it saves.

At layer ``l`` only the most recent ``q_l`` S tokens (plus every NS token) emit
queries; keys/values still come from the layer's whole input; only those ``q_l``
S outputs go on to layer ``l+1``. A request with ``L_b`` S tokens keeps
``min(L_b, q_0, ..., q_l)`` of them after layer ``l``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from recsys.model.config import PyramidConfig

UNBOUNDED = 2**62  # "keep every S token"


@dataclass(frozen=True)
class PyramidSchedule:
    """Per-layer S-query budgets ``q_l`` (non-increasing)."""

    queries: tuple[int, ...]

    def __post_init__(self) -> None:
        if any(q < 0 for q in self.queries):
            raise ValueError(f"pyramid queries must be >= 0, got {self.queries}")
        if any(b > a for a, b in zip(self.queries, self.queries[1:])):
            raise ValueError(f"pyramid queries must be non-increasing layer to layer, got {self.queries}")

    @property
    def n_layers(self) -> int:
        return len(self.queries)

    @classmethod
    def from_config(cls, cfg: PyramidConfig, n_layers: int, max_s_tokens: int) -> PyramidSchedule:
        """Build the schedule.

        ``max_s_tokens`` is the longest S sequence the model will see (after loader
        truncation); the linear mode shrinks from it to ``cfg.final`` at the top layer.
        """
        if cfg.mode == "none":
            return cls((UNBOUNDED,) * n_layers)
        if cfg.mode == "explicit":
            if len(cfg.queries) != n_layers:
                raise ValueError(f"pyramid.queries needs {n_layers} entries, got {len(cfg.queries)}")
            return cls(tuple(int(q) for q in cfg.queries))
        if n_layers == 1:
            return cls((UNBOUNDED,))
        top = min(cfg.final, max_s_tokens)
        qs = []
        for layer in range(n_layers):
            frac = layer / (n_layers - 1)
            q = max_s_tokens - (max_s_tokens - top) * frac
            q = top if layer == n_layers - 1 else min(max_s_tokens, cfg.round_to * math.ceil(q / cfg.round_to))
            qs.append(int(q))
        qs[0] = UNBOUNDED  # the first layer always sees the whole (already truncated) history
        return cls(tuple(qs))

    def budget(self, layer: int) -> int:
        """S queries computed at ``layer``. The top layer's S outputs feed nothing (only NS tokens
        reach the heads), so the ranker computes none there, whatever the schedule says."""
        return 0 if layer == self.n_layers - 1 else self.queries[layer]

    def kept(self, layer: int, length: int) -> int:
        """S tokens that emit queries (and survive) at ``layer`` for an input of ``length`` S tokens."""
        return min(length, self.budget(layer))

    def lengths(self, length: int) -> list[int]:
        """S-token count at the input of each layer and after the last, ``[n_layers + 1]``."""
        out = [length]
        for layer in range(self.n_layers):
            out.append(self.kept(layer, out[-1]))
        return out

    def describe(self) -> str:
        return "[" + ", ".join("all" if q >= UNBOUNDED else str(q) for q in self.queries) + "]"


def layer_flops(l_in: int, l_q: int, n_ns: int, n_cand: int, d: int, ffn: int) -> dict[str, float]:
    """Forward FLOPs of one OneTrans layer for one request (multiply-add = 2 FLOPs).

    S part (once per request): K/V projections for all ``l_in`` inputs, Q/O/FFN for the
    ``l_q`` kept queries, causal attention of those queries (query j sees ``l_in - l_q + j + 1``
    keys). NS part (per candidate, ``n_cand`` of them): Q/K/V/O/FFN for ``n_ns`` tokens, each
    attending to the ``l_in`` prefix keys plus its own earlier NS tokens.
    """
    s_keys_seen = l_q * (l_in - l_q) + l_q * (l_q + 1) / 2
    s = 2 * d * d * (2 * l_in + 2 * l_q) + 2 * 2 * d * s_keys_seen + 2 * 2 * d * ffn * l_q
    ns_keys_seen = n_ns * l_in + n_ns * (n_ns + 1) / 2
    ns = n_cand * (2 * d * d * 4 * n_ns + 2 * 2 * d * ns_keys_seen + 2 * 2 * d * ffn * n_ns)
    return {"s_flops": s, "ns_flops": ns, "flops": s + ns}


def flops_report(schedule: PyramidSchedule, history_len: int, n_ns: int, n_cand: int, d: int,
                 ffn: int) -> list[dict[str, float]]:
    """Per-layer forward FLOPs for one request, with this schedule and with no pyramid (every
    layer keeps every S query, except the top one, whose S outputs are never computed)."""
    with_p = schedule.lengths(history_len)
    flat = PyramidSchedule((UNBOUNDED,) * schedule.n_layers).lengths(history_len)
    rows = []
    for layer in range(schedule.n_layers):
        pyr = layer_flops(with_p[layer], with_p[layer + 1], n_ns, n_cand, d, ffn)
        full = layer_flops(flat[layer], flat[layer + 1], n_ns, n_cand, d, ffn)
        rows.append({"layer": layer, "s_in": with_p[layer], "s_queries": with_p[layer + 1],
                     "flops_pyramid": pyr["flops"], "flops_no_pyramid": full["flops"]})
    return rows


def batch_flops(schedule: PyramidSchedule, s_lengths: list[int], cand_counts: list[int], n_ns: int, d: int,
                ffn: int) -> float:
    """Forward FLOPs of the shared-prefix ranker on one batch with these jagged lengths."""
    total = 0.0
    for length, n_cand in zip(s_lengths, cand_counts):
        lens = schedule.lengths(length)
        total += sum(layer_flops(lens[i], lens[i + 1], n_ns, n_cand, d, ffn)["flops"]
                     for i in range(schedule.n_layers))
    return total
