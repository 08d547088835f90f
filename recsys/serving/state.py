"""Per-user S-token state: stage 1 of the ranker, computed incrementally.

Shape legend: ``L`` S tokens of a user (after loader truncation), ``d`` appended ones,
``D`` model width, ``H`` heads, ``Dh = D / H``, ``q_l = schedule.budget(l)`` (pyramid:
S queries of layer ``l``; 0 at the top layer).

Windows. Layer ``l`` sees the last ``n_l = min(L, m_l)`` S positions, with the window cap
``m_l = min(q_0, ..., q_{l-1})`` (``m_0`` unbounded); its last ``min(n_l, q_l)`` positions emit
queries and become layer ``l+1``'s input.

Exact appends. Causal attention makes a position's output depend only on the positions
before it *inside the layer's window*. Appending ``d`` events (``L -> L + d``):

* while ``L + d <= m_l`` the window of layer ``l`` still starts at position 0: its cached K/V
  and the outputs of old positions are unchanged, so only the ``d`` new positions are
  projected and queried;
* once ``L + d > m_l`` the window *slides*: the oldest positions leave layer ``l``'s key set,
  so every output of layer ``l`` changes. The K/V of the positions still in the window stay
  valid (they depend on the layer's *inputs*, which are unchanged), but all queries of the
  window are recomputed from the stored inputs, and every layer above is recomputed over its
  (pyramid-sized, short) window. That is why the state keeps, for each layer whose window can
  slide (``m_l`` bounded) and that emits queries, the last ``min(n_l, q_l)`` inputs of that layer.

Layer 0's window never slides (``m_0`` unbounded): without a pyramid, an append only ever
computes the new positions. Loader truncation (the oldest *event* dropped) changes S position
0 itself and is not an append: the cache treats it as a miss (see ``docs/serving.md``).

Memory per user (fp32, bytes): ``sum_l 2 * n_l * D * 4`` (K/V) ``+ sum_{l stored} min(n_l, q_l) * D * 4``
(inputs) ``+ 40 * L`` (event identities, ``recsys.serving.events``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kernels.jagged_causal_attention import jagged_causal_attention
from recsys.data.jagged import lengths_to_offsets
from recsys.model.pyramid import UNBOUNDED, PyramidSchedule
from recsys.model.ranker import OneTransRanker, PrefixKV


@dataclass
class UserKVState:
    """One user's reusable stage-1 state (its cache entry).

    ``events [L, 5]`` int64: the version (``recsys.serving.events``). ``keys[l], values[l]``:
    ``[n_l, H, Dh]`` K/V of layer ``l``'s input window. ``inputs[l]``: ``[min(n_l, q_l), D]``
    last inputs of layer ``l`` when that layer's window can slide, else ``None``.
    """

    events: np.ndarray
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    inputs: list[torch.Tensor | None]

    @property
    def length(self) -> int:
        """S tokens covered (``L``)."""
        return int(self.events.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by this state's arrays (what the cache budget counts)."""
        tensors = [*self.keys, *self.values, *(x for x in self.inputs if x is not None)]
        return int(self.events.nbytes) + sum(t.numel() * t.element_size() for t in tensors)


def window_caps(schedule: PyramidSchedule) -> list[int]:
    """``m_l = min(q_0, ..., q_{l-1})`` per layer (``m_0`` = ``UNBOUNDED``): layer ``l`` sees ``min(L, m_l)`` S tokens."""
    caps, m = [], UNBOUNDED
    for layer in range(schedule.n_layers):
        caps.append(m)
        m = min(m, schedule.budget(layer))
    return caps


def stores_inputs(schedule: PyramidSchedule, layer: int) -> bool:
    """Whether the state keeps layer inputs: the window can slide and the layer emits queries."""
    return window_caps(schedule)[layer] < UNBOUNDED and schedule.budget(layer) > 0


def empty_state(model: OneTransRanker, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> UserKVState:
    """The state of an empty history (every layer: zero rows)."""
    cfg = model.cfg
    h, dh = cfg.n_heads, cfg.d_model // cfg.n_heads
    n = len(model.blocks)
    kv = [torch.zeros(0, h, dh, device=device, dtype=dtype) for _ in range(n)]
    inputs = [torch.zeros(0, cfg.d_model, device=device, dtype=dtype) if stores_inputs(model.schedule, layer) else None
              for layer in range(n)]
    return UserKVState(np.zeros((0, 5), np.int64), kv, [t.clone() for t in kv], inputs)


@dataclass
class _LayerInput:
    """One layer's jagged input rows of every job and which of them emit queries."""

    x: torch.Tensor
    """``[sum seg_j, D]`` rows projected to K/V (the stored old inputs a slid window re-queries, then the new rows)."""
    keep_idx: torch.Tensor
    """``[sum n_q]`` rows of ``x`` that emit queries."""
    positions: torch.Tensor
    """``[sum seg_j]`` absolute S positions of ``x``'s rows."""
    q_lens: list[int]
    kv_lens: list[int]
    """Window length of every job after the append."""
    slid: list[bool]
    """Whether every output of the job's window changed (its window slid, or a lower one did)."""


def _layer_input(states: list[UserKVState], layer: int, rows: list[torch.Tensor], dirty: list[bool],
                 new_len: list[int], cap: int, budget: int, device: torch.device) -> _LayerInput:
    """Layer ``layer``'s rows: per job, the new rows, preceded by stored old inputs when the window slid."""
    pieces, keep, q_lens, kv_lens, slid, positions = [], [], [], [], [], []
    start = 0
    for j, st in enumerate(states):
        n_new = min(new_len[j], cap)  # window length after the append
        n_out = min(n_new, budget)  # positions that emit queries (= next layer's window)
        r = rows[j].shape[0]
        moved = dirty[j] or new_len[j] > cap  # every output of the window must be recomputed
        n_q = n_out if moved else min(r, n_out)
        x_old = max(0, n_q - r)  # old inputs needed as queries (only when the window slid)
        if x_old:
            stored = st.inputs[layer]
            if stored is None or stored.shape[0] < x_old:
                raise AssertionError(f"layer {layer}: state keeps too few inputs for a sliding window")
            pieces.append(stored[stored.shape[0] - x_old:])
        pieces.append(rows[j])
        seg = x_old + r
        # A layer's rows are always the *last* positions of the user's S sequence.
        positions.append(torch.arange(new_len[j] - seg, new_len[j], device=device))
        keep.append(torch.arange(start + seg - n_q, start + seg, device=device))
        q_lens.append(n_q)
        kv_lens.append(n_new)
        slid.append(moved)
        start += seg
    x = torch.cat(pieces) if pieces else rows[0][:0]
    keep_idx = torch.cat(keep)
    return _LayerInput(x, keep_idx, torch.cat(positions) if positions else keep_idx, q_lens, kv_lens, slid)


def _layer_state(states: list[UserKVState], layer: int, rows: list[torch.Tensor], dirty: list[bool],
                 li: _LayerInput, k_x: torch.Tensor, v_x: torch.Tensor, store: bool, budget: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per job, layer ``layer``'s new (keys ``[n_l, H, Dh]``, values, stored inputs or None): the old window
    rows still in the window followed by the new rows' K/V (``k_x``, ``v_x``: ``[sum seg_j, H, Dh]``)."""
    out = []
    start = 0
    for j, st in enumerate(states):
        r = rows[j].shape[0]
        seg = (li.q_lens[j] - r if li.q_lens[j] > r else 0) + r
        n_keep_old = 0 if dirty[j] else li.kv_lens[j] - r  # old window rows still in the window
        old_k, old_v = st.keys[layer], st.values[layer]
        k_new = torch.cat([old_k[old_k.shape[0] - n_keep_old:], k_x[start + seg - r:start + seg]])
        v_new = torch.cat([old_v[old_v.shape[0] - n_keep_old:], v_x[start + seg - r:start + seg]])
        if k_new.shape[0] != li.kv_lens[j]:
            raise AssertionError(f"layer {layer}, job {j}: {k_new.shape[0]} keys, expected {li.kv_lens[j]}")
        stored = None
        if store:
            full = rows[j] if dirty[j] else torch.cat([st.inputs[layer], rows[j]])
            stored = full[full.shape[0] - min(li.kv_lens[j], budget):].clone()
        out.append((k_new, v_new, stored))
        start += seg
    return out


@torch.no_grad()
def extend_states(model: OneTransRanker, states: list[UserKVState], new_rows: torch.Tensor,
                  new_offsets: torch.Tensor, new_events: list[np.ndarray]) -> list[UserKVState]:
    """Append S tokens to many users' states at once (stage 1, incremental, jagged-batched).

    Args:
        states: ``J`` states (``empty_state`` for a user computed from scratch).
        new_rows: ``[sum_j d_j, D]`` S tokens of the appended positions, job-major, oldest first.
        new_offsets: ``[J+1]`` int64.
        new_events: per job, the *full* event identities ``[L_j + d_j, 5]`` of the new state.

    Returns new states (the inputs are not modified). Equal, to float tolerance, to running
    ``model.encode_prefix`` on the whole new history (``tests/serving/test_state.py``).
    """
    sched = model.schedule
    caps = window_caps(sched)
    off = new_offsets.tolist()
    n_jobs = len(states)
    new_len = [states[j].length + off[j + 1] - off[j] for j in range(n_jobs)]
    for j in range(n_jobs):
        if new_events[j].shape[0] != new_len[j]:
            raise ValueError(f"job {j}: {new_events[j].shape[0]} events for {new_len[j]} S tokens")
    rows = [new_rows[off[j]:off[j + 1]] for j in range(n_jobs)]  # this layer's input rows per job
    dirty = [False] * n_jobs  # inputs of old positions changed (a lower window slid): rows = whole window
    layers: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = []  # [layer][job]
    dev = new_rows.device
    for layer, blk in enumerate(model.blocks):
        budget = sched.budget(layer)
        li = _layer_input(states, layer, rows, dirty, new_len, caps[layer], budget, dev)
        q, k_x, v_x = blk.s_project(li.x, li.keep_idx, li.positions)  # q [sum n_q, H, Dh]; k_x, v_x [sum seg]
        layers.append(_layer_state(states, layer, rows, dirty, li, k_x, v_x, stores_inputs(sched, layer), budget))
        if layer == len(model.blocks) - 1:
            break
        q_off = lengths_to_offsets(torch.tensor(li.q_lens, dtype=torch.int64, device=dev))
        if int(q_off[-1]):
            kv_off = lengths_to_offsets(torch.tensor(li.kv_lens, dtype=torch.int64, device=dev))
            attn = jagged_causal_attention(q, torch.cat([kv[0] for kv in layers[-1]]),
                                           torch.cat([kv[1] for kv in layers[-1]]), kv_off, q_off,
                                           backend=model.backend)
            out = blk.s_finish(li.x[li.keep_idx], attn)  # [sum n_q, D]
        else:  # nothing queried at this layer (an empty pyramid budget)
            out = li.x[li.keep_idx]
        qo = q_off.tolist()
        rows = [out[qo[j]:qo[j + 1]] for j in range(n_jobs)]
        dirty = li.slid
    return [UserKVState(new_events[j], [lay[j][0] for lay in layers], [lay[j][1] for lay in layers],
                        [lay[j][2] for lay in layers]) for j in range(n_jobs)]


def states_to_prefix(states: list[UserKVState]) -> PrefixKV:
    """Concatenate per-user states into the batch ``PrefixKV`` that ``score_candidates`` reads
    (one copy of each user's K/V per batch; never one per candidate)."""
    n_layers = len(states[0].keys)
    keys, values, offsets = [], [], []
    for layer in range(n_layers):
        ks = [s.keys[layer] for s in states]
        keys.append(torch.cat(ks))
        values.append(torch.cat([s.values[layer] for s in states]))
        offsets.append(lengths_to_offsets(torch.tensor([k.shape[0] for k in ks], dtype=torch.int64,
                                                       device=ks[0].device)))
    return PrefixKV(keys, values, offsets)
