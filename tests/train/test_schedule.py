"""Dense learning-rate multiplier: warm-up, constant, cosine."""

import math

import pytest

from recsys.dist.schedule import lr_multiplier


def test_warmup_is_linear_then_constant():
    assert [lr_multiplier(s, 4, 100, "constant", 0.1) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_from_one_to_min_ratio():
    vals = [lr_multiplier(s, 10, 110, "cosine", 0.1) for s in range(10, 111)]
    assert vals[0] == pytest.approx(1.0)
    assert vals[50] == pytest.approx(0.55)  # half-way: (1 + 0.1) / 2
    assert vals[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert lr_multiplier(500, 10, 110, "cosine", 0.1) == pytest.approx(0.1)  # clamped past the end


def test_cosine_without_room_after_warmup_stays_at_one():
    assert lr_multiplier(12, 10, 5, "cosine", 0.0) == 1.0
    assert math.isclose(lr_multiplier(0, 0, 5, "cosine", 0.0), 1.0)  # warmup 0 counts as 1 step
