"""The studies' statistics (benchmarks/studies/intervals.py) against hand-computed values."""

from __future__ import annotations

import pytest

from benchmarks.studies.intervals import (
    area_under_curve,
    bootstrap_interval,
    first_reaching,
    paired_differences,
    verdict,
)


def test_bootstrap_of_two_values_spans_them():
    # resampled means of [0, 1] are 0, 0.5 or 1 with chances 1/4, 1/2, 1/4: the 2.5th and 97.5th
    # percentiles are 0 and 1
    assert bootstrap_interval([0.0, 1.0]) == (0.5, 0.0, 1.0)


def test_bootstrap_of_equal_values_has_no_width():
    assert bootstrap_interval([0.4, 0.4, 0.4]) == pytest.approx((0.4, 0.4, 0.4))


def test_bootstrap_interval_narrows_inside_the_range():
    # 5 seeds: the interval of the mean lies strictly inside [min, max] and around the mean
    mean, low, high = bootstrap_interval([0.30, 0.35, 0.40, 0.45, 0.50])
    assert mean == pytest.approx(0.40)
    assert 0.30 < low < 0.36 and 0.44 < high < 0.50
    assert bootstrap_interval([0.30, 0.35, 0.40, 0.45, 0.50], seed=0) == (mean, low, high)


def test_paired_differences_match_seeds():
    arm = {1: 0.5, 2: 0.4, 3: 0.3}
    baseline = {3: 0.1, 1: 0.2, 4: 0.9}
    assert paired_differences(arm, baseline) == pytest.approx([0.3, 0.2])
    with pytest.raises(ValueError, match="no seed in common"):
        paired_differences({1: 0.1}, {2: 0.1})


def test_verdict_needs_the_interval_to_exclude_zero():
    assert verdict(0.01, 0.05) == "better"
    assert verdict(-0.05, -0.01) == "worse"
    assert verdict(-0.01, 0.05) == "no difference shown"
    assert verdict(0.0, 0.05) == "no difference shown"  # an interval that touches zero does not exclude it
    assert verdict(-0.05, 0.0) == "no difference shown"
    assert verdict(0.01, 0.05, higher_is_better=False) == "worse"


def test_area_under_curve_is_the_mean_height():
    # trapezoids: 10 * (0 + 1) / 2 + 10 * (1 + 1) / 2 = 15 over 20 steps
    assert area_under_curve([0, 10, 20], [0.0, 1.0, 1.0]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="at least two points"):
        area_under_curve([0], [0.1])


def test_first_reaching():
    assert first_reaching([0, 20, 40], [0.2, 0.36, 0.5], 0.35) == 20
    assert first_reaching([0, 20, 40], [0.2, 0.3, 0.34], 0.35) is None
