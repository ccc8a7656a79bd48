"""Schedules as pure functions of the step (no Ray)."""

from __future__ import annotations

import math

import pytest

from glare.engine.schedules import cosine, linear_warmup, warmup_cosine


def test_cosine_runs_from_start_to_end_through_the_midpoint():
    assert cosine(0, 100, 1.0, 0.2) == pytest.approx(1.0)
    assert cosine(50, 100, 1.0, 0.2) == pytest.approx(0.6)
    assert cosine(25, 100, 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine(100, 100, 1.0, 0.2) == cosine(500, 100, 1.0, 0.2) == 0.2  # held at the end
    assert cosine(3, 0, 1.0, 0.2) == 0.2  # no steps: already at the end
    values = [cosine(s, 100, 1.0, 0.2) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_cosine_ramps_linearly_then_decays_to_final():
    peak, final = 0.4, 0.01
    assert [warmup_cosine(s, 110, peak, final, warmup=10) for s in range(3)] == pytest.approx([0.04, 0.08, 0.12])
    assert warmup_cosine(9, 110, peak, final, warmup=10) == pytest.approx(peak)  # the last warm-up step
    assert warmup_cosine(10, 110, peak, final, warmup=10) == pytest.approx(peak)  # cosine starts at the peak
    assert warmup_cosine(60, 110, peak, final, warmup=10) == pytest.approx((peak + final) / 2)
    assert warmup_cosine(110, 110, peak, final, warmup=10) == pytest.approx(final)
    assert warmup_cosine(0, 5, peak, final, warmup=0) == pytest.approx(peak)  # no warm-up


def test_linear_warmup_reaches_end_and_stays():
    assert [linear_warmup(s, 4, 0.04, 0.08) for s in range(6)] == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.08, 0.08])
    assert linear_warmup(0, 0, 0.04, 0.08) == 0.08  # no warm-up: the end value from step 0
