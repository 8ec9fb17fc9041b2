"""Paired comparison of two settings scored on the same cases (numpy only).

``compare`` scores every variant on the same held-out cases of the same folds and seeds, so a
variant and the reference form pairs ``(a_i, b_i)``; their differences ``d_i = a_i - b_i`` carry
the comparison. Two summaries of them:

- a percentile **bootstrap interval** of the mean difference (cases resampled with replacement,
  seeded, so the same rows give the same interval);
- a two-sided **sign-flip permutation test** of a zero mean difference (under the null each
  ``d_i`` is as likely to be ``-d_i``): exact over all ``2^n`` sign patterns up to
  ``EXACT_MAX_PAIRS`` pairs, else Monte Carlo with the ``(k + 1) / (m + 1)`` estimate. With
  ``n`` pairs the smallest exact p-value is ``2 / 2^n``: two pairs can never reach 0.05, which
  is the honest answer for two cases.

Pairs with a NaN on either side (a metric undefined for that case) are dropped.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

EXACT_MAX_PAIRS = 16
BOOTSTRAP_SAMPLES = 10_000
PERMUTATIONS = 20_000


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over the usable pairs, its interval and test.

    Attributes:
        n: pairs with both values defined.
        mean: mean difference (NaN without pairs).
        low, high: bootstrap interval of the mean at ``confidence`` (NaN with fewer than 2 pairs).
        p_value: two-sided sign-flip p-value (1.0 when every difference is 0; NaN without pairs).
        wins, losses: pairs where ``a`` is above / below ``b``.
    """

    n: int
    mean: float
    low: float
    high: float
    p_value: float
    wins: int
    losses: int


def _differences(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired values need two 1-D sequences of one length: {x.shape} {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    return x[keep] - y[keep]


def bootstrap_interval(
    d: np.ndarray, *, confidence: float = 0.95, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(d)`` (NaN, NaN for fewer than 2 values)."""
    if d.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(samples, d.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def sign_flip_p_value(d: np.ndarray, *, permutations: int = PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided p-value of ``mean(d) = 0`` by flipping the signs of the differences."""
    if d.size == 0:
        return math.nan
    observed = abs(float(d.mean()))
    if observed == 0.0:
        return 1.0
    tol = 1e-12 * max(1.0, observed)
    if d.size <= EXACT_MAX_PAIRS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        means = np.abs(signs @ d) / d.size
        return float(np.mean(means >= observed - tol))
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(permutations, d.size))
    extreme = int(np.sum(np.abs(signs @ d) / d.size >= observed - tol))
    return (extreme + 1) / (permutations + 1)


def paired_difference(
    a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95, seed: int = 0
) -> PairedDifference:
    """Compare ``a`` with ``b`` pair by pair (same cases, same order).

    Raises:
        ValueError: the sequences differ in length or are not one-dimensional.
    """
    d = _differences(a, b)
    if d.size == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan, math.nan, 0, 0)
    low, high = bootstrap_interval(d, confidence=confidence, seed=seed)
    return PairedDifference(
        n=int(d.size),
        mean=float(d.mean()),
        low=low,
        high=high,
        p_value=sign_flip_p_value(d, seed=seed),
        wins=int(np.sum(d > 0)),
        losses=int(np.sum(d < 0)),
    )


__all__ = [
    "PairedDifference",
    "bootstrap_interval",
    "paired_difference",
    "sign_flip_p_value",
]
