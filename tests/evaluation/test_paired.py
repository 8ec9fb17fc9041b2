"""Tests for segmenter.evaluation.paired: bootstrap interval and sign-flip test of paired
differences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segmenter.evaluation.paired import (
    EXACT_MAX_PAIRS,
    bootstrap_interval,
    paired_difference,
    sign_flip_p_value,
)


def test_exact_p_value_counts_the_sign_patterns_as_extreme_as_the_data() -> None:
    # four positive differences: only all-plus and all-minus are as extreme -> 2 / 16
    assert sign_flip_p_value(np.array([0.1, 0.2, 0.3, 0.4])) == pytest.approx(2 / 16)
    # two pairs can never reach 0.05
    assert sign_flip_p_value(np.array([0.5, 0.5])) == pytest.approx(0.5)
    # one pair against the others: patterns with |mean| >= 0.4 out of 8
    d = np.array([1.0, 0.1, 0.1])
    signs = np.array([[a, b, c] for a in (1, -1) for b in (1, -1) for c in (1, -1)])
    expected = np.mean(np.abs(signs @ d) / 3 >= abs(d.mean()) - 1e-12)
    assert sign_flip_p_value(d) == pytest.approx(expected)
    assert sign_flip_p_value(np.zeros(5)) == 1.0
    assert math.isnan(sign_flip_p_value(np.array([])))


def test_monte_carlo_p_value_past_the_exact_size() -> None:
    rng = np.random.default_rng(1)
    shifted = rng.normal(0.5, 0.2, EXACT_MAX_PAIRS + 10)
    centred = rng.normal(0.0, 0.2, EXACT_MAX_PAIRS + 10)
    assert sign_flip_p_value(shifted) < 0.001
    assert sign_flip_p_value(centred) > 0.05
    # never 0: the (k + 1) / (m + 1) estimate
    assert sign_flip_p_value(shifted) > 0


def test_bootstrap_interval_holds_the_mean_and_is_reproducible() -> None:
    d = np.array([0.02, 0.05, -0.01, 0.04, 0.03, 0.06, 0.00, 0.02])
    low, high = bootstrap_interval(d)
    assert low < d.mean() < high
    assert (low, high) == bootstrap_interval(d)
    assert low > d.min() and high < d.max()
    assert all(math.isnan(v) for v in bootstrap_interval(np.array([0.3])))


def test_paired_difference_drops_undefined_pairs_and_counts_wins() -> None:
    a = [0.8, 0.7, math.nan, 0.9, 0.5]
    b = [0.6, 0.7, 0.4, 0.5, math.nan]
    r = paired_difference(a, b)
    assert r.n == 3
    assert r.mean == pytest.approx((0.2 + 0.0 + 0.4) / 3)
    assert (r.wins, r.losses) == (2, 0)
    assert r.low <= r.mean <= r.high
    empty = paired_difference([math.nan], [0.5])
    assert empty.n == 0 and math.isnan(empty.mean) and math.isnan(empty.p_value)
    with pytest.raises(ValueError, match="one length"):
        paired_difference([1.0, 2.0], [1.0])
