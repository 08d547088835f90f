"""Stage 1 computed incrementally (`extend_states`) == `encode_prefix` on the whole history."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from serving_helpers import make_model

from recsys.model.config import PyramidConfig
from recsys.serving.state import empty_state, extend_states, states_to_prefix, window_caps

PYRAMIDS = {
    "none": PyramidConfig(mode="none"),
    "linear": PyramidConfig(mode="linear", final=0, round_to=2),  # max_s=12: windows slide inside the test lengths
    "explicit": PyramidConfig(mode="explicit", queries=[9, 5, 0]),
    "explicit_first_bounded": PyramidConfig(mode="explicit", queries=[4, 3, 2]),
}


def fake_events(n: int) -> np.ndarray:
    return np.arange(5 * n, dtype=np.int64).reshape(n, 5)


def extend(model, state, rows: torch.Tensor, full_len: int):
    off = torch.tensor([0, rows.shape[0]], dtype=torch.int64)
    return extend_states(model, [state], rows, off, [fake_events(full_len)])[0]


def assert_state_matches_prefix(model, state, s_tokens: torch.Tensor) -> None:
    ref = model.encode_prefix(s_tokens, torch.tensor([0, s_tokens.shape[0]], dtype=torch.int64))
    for layer in range(len(model.blocks)):
        torch.testing.assert_close(state.keys[layer], ref.keys[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state.values[layer], ref.values[layer], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pyramid", sorted(PYRAMIDS))
@pytest.mark.parametrize("steps", [[0, 1, 1, 1], [5, 1, 3, 4, 1], [1, 7, 6], [12, 0, 2]])
def test_appends_equal_recompute(pyramid, steps):
    """Several appends in a row (incl. append of 1, append to an empty history, windows sliding)."""
    n_layers = 3 if pyramid != "none" else 2
    model = make_model(n_layers, PYRAMIDS[pyramid], max_s=12)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(sum(steps), 16, generator=g)
    state, done = empty_state(model), 0
    with torch.no_grad():
        for d in steps:
            if d == 0:
                continue
            state = extend(model, state, tokens[done:done + d], done + d)
            done += d
            assert state.length == done
            assert_state_matches_prefix(model, state, tokens[:done])


def test_batched_jobs_equal_one_by_one():
    """Jobs of different users (empty base, appends that slide a window, appends that don't) in one call."""
    model = make_model(3, PYRAMIDS["explicit"], max_s=12)
    g = torch.Generator().manual_seed(2)
    hist = [torch.randn(n, 16, generator=g) for n in (0, 3, 8, 11)]
    extra = [torch.randn(n, 16, generator=g) for n in (4, 1, 2, 6)]
    with torch.no_grad():
        bases = [extend(model, empty_state(model), h, h.shape[0]) if h.shape[0] else empty_state(model)
                 for h in hist]
        rows = torch.cat(extra)
        off = torch.tensor(np.concatenate([[0], np.cumsum([e.shape[0] for e in extra])]), dtype=torch.int64)
        out = extend_states(model, bases, rows, off, [fake_events(h.shape[0] + e.shape[0]) for h, e in zip(hist, extra)])
        for st, h, e in zip(out, hist, extra):
            assert_state_matches_prefix(model, st, torch.cat([h, e]))
        # the batch prefix built from the states equals encode_prefix of the jagged batch
        full = [torch.cat([h, e]) for h, e in zip(hist, extra)]
        s_off = torch.tensor(np.concatenate([[0], np.cumsum([f.shape[0] for f in full])]), dtype=torch.int64)
        ref = model.encode_prefix(torch.cat(full), s_off)
        got = states_to_prefix(out)
        for layer in range(3):
            torch.testing.assert_close(got.offsets[layer], ref.offsets[layer])
            torch.testing.assert_close(got.keys[layer], ref.keys[layer], rtol=1e-5, atol=1e-5)


def test_memory_model_and_caps():
    model = make_model(3, PYRAMIDS["explicit"], max_s=12)
    assert window_caps(model.schedule)[1:] == [9, 5]
    with torch.no_grad():
        st = extend(model, empty_state(model), torch.randn(11, 16), 11)
    # K/V rows per layer: min(L, m_l) = 11, 9, 5; stored inputs: layer 1 keeps min(9, 5) = 5 rows
    assert [k.shape[0] for k in st.keys] == [11, 9, 5]
    assert [None if x is None else x.shape[0] for x in st.inputs] == [None, 5, None]
    d, fp32 = 16, 4
    assert st.nbytes == 2 * (11 + 9 + 5) * d * fp32 + 5 * d * fp32 + 11 * 5 * 8
