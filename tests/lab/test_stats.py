"""Intervals and paired tests agree with independent computations and refuse bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvscope.lab.stats import Z95, bootstrap_mean, bootstrap_ratio, mcnemar, wilson


def _score_test_bounds(k: int, n: int) -> tuple[float, float]:
    """The Wilson interval by its definition: the p the score test does not reject (bisection)."""

    def inside(p: float) -> bool:
        return abs(k / n - p) <= Z95 * math.sqrt(p * (1 - p) / n)

    def edge(a: float, b: float) -> float:  # a inside, b outside
        for _ in range(80):
            m = (a + b) / 2
            a, b = (m, b) if inside(m) else (a, m)
        return a

    p_hat = k / n
    return (0.0 if k == 0 else edge(p_hat, 0.0)), (1.0 if k == n else edge(p_hat, 1.0))


@pytest.mark.parametrize(("k", "n"), [(0, 10), (10, 10), (57, 100), (3, 200), (1, 2)])
def test_wilson_interval_is_the_score_test_inversion(k: int, n: int) -> None:
    est = wilson(k, n)
    lo, hi = _score_test_bounds(k, n)
    assert est.value == k / n and est.n == n
    assert est.lo == pytest.approx(lo, abs=1e-9) and est.hi == pytest.approx(hi, abs=1e-9)


def test_wilson_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(11, 10)
    assert math.isnan(wilson(0, 0).value) and wilson(0, 0).fmt() == "—"


def test_mcnemar_counts_only_discordant_pairs_and_matches_the_binomial() -> None:
    a = [True] * 10 + [False] * 3 + [True] * 50 + [False] * 20
    b = [False] * 10 + [True] * 3 + [True] * 50 + [False] * 20
    test = mcnemar(a, b)
    assert (test.only_a, test.only_b) == (10, 3)
    # Two-sided exact: 2 * P(X <= 3), X ~ Binomial(13, 1/2) = 2 * (1 + 13 + 78 + 286) / 2**13.
    assert test.p_value == pytest.approx(2 * 378 / 8192)
    assert mcnemar(a, a).p_value == 1.0
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar(a, b[:-1])


def test_bootstrap_intervals_cover_the_estimate_and_narrow_with_more_episodes() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 25), rng.normal(1.0, 1.0, 400)
    a, b = bootstrap_mean(small), bootstrap_mean(large)
    assert a.lo < a.value < a.hi and b.lo < b.value < b.hi
    assert (b.hi - b.lo) < (a.hi - a.lo) / 2
    assert bootstrap_mean(small, seed=3) == bootstrap_mean(small, seed=3)
    ratio = bootstrap_ratio([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
    assert ratio.value == 0.5 and ratio.lo == ratio.hi == 0.5  # every resample has the same ratio
    with pytest.raises(ValueError, match="equal lengths"):
        bootstrap_ratio([1.0], [1.0, 2.0])
