"""Tango's score interval and test, re-derived independently of the package's quadratic formula."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from lnsdiag.stats import (
    mcnemar_exact_pvalue,
    paired_proportion_interval,
    paired_proportion_pvalue,
    tango_interval,
    tango_pvalue,
    tango_statistic,
)
from tests.stats.synthetic import binary_pair

PHI = NormalDist()


def independent_tango(b, c, n, deltas):
    """Tango's T over an array of Δ₀, with the restricted MLE found by ternary search.

    Maximises b·log q + c·log(q + Δ₀) + (n − b − c)·log(1 − 2q − Δ₀) over the feasible q
    (a concave function), for every Δ₀ at once: no quadratic formula involved.
    """
    deltas = np.asarray(deltas, dtype=float)
    lo = np.maximum(0.0, -deltas)
    hi = np.maximum(lo, (1.0 - deltas) / 2.0)
    m = n - b - c

    def loglik(q):
        with np.errstate(divide="ignore", invalid="ignore"):
            cells = ((b, q), (c, q + deltas), (m, 1 - 2 * q - deltas))
            parts = [k * np.log(x) if k else np.zeros_like(x) for k, x in cells]
        return sum(parts)

    for _ in range(200):
        a1 = lo + (hi - lo) / 3
        a2 = hi - (hi - lo) / 3
        left_better = loglik(a1) >= loglik(a2)
        hi = np.where(left_better, a2, hi)
        lo = np.where(left_better, lo, a1)
    q = (lo + hi) / 2
    var = n * (q + (q + deltas) - deltas**2)  # n · Var(single pair's c-indicator − b-indicator)
    num = c - b - n * deltas
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / np.sqrt(var)


CASES = [(0, 0, 5), (10, 2, 100), (3, 4, 20), (0, 5, 5), (1, 0, 7), (7, 1, 30), (40, 55, 1000), (2, 0, 2)]


@pytest.mark.parametrize(("b", "c", "n"), CASES)
def test_tango_statistic_matches_independent_mle(b, c, n):
    deltas = np.linspace(-0.97, 0.97, 41)
    ours = np.array([tango_statistic(b, c, n, d) for d in deltas])
    np.testing.assert_allclose(ours, independent_tango(b, c, n, deltas), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("b", "c", "n"), CASES)
@pytest.mark.parametrize("level", [0.90, 0.95])
def test_tango_interval_is_where_grid_scan_crosses_z(b, c, n, level):
    z = PHI.inv_cdf(1 - (1 - level) / 2)
    step = 2e-5
    grid = np.arange(-1 + step, 1, step)
    t = independent_tango(b, c, n, grid)
    inside = grid[np.abs(t) <= z]
    lo, hi = tango_interval(b, c, n, level)
    assert inside.size and np.all(np.diff(inside) < 1.5 * step)  # one contiguous interval
    assert lo == pytest.approx(inside.min(), abs=2 * step) or (lo == -1.0 and inside.min() < -1 + 2 * step)
    assert hi == pytest.approx(inside.max(), abs=2 * step) or (hi == 1.0 and inside.max() > 1 - 2 * step)
    assert lo <= (c - b) / n <= hi


def test_tango_sanity_values():
    z95 = PHI.inv_cdf(0.975)
    lo, hi = tango_interval(0, 0, 5, 0.95)
    # no changed answer: the interval is ±z²/(n + z²) (solve nΔ/(1 − Δ) = z² by hand)
    assert hi == pytest.approx(z95**2 / (5 + z95**2), rel=1e-9) and lo == pytest.approx(-hi, rel=1e-9)
    assert hi == pytest.approx(0.4345, abs=1e-3) and hi > 0.01
    lo, hi = tango_interval(0, 0, 10_000, 0.90)
    assert -0.01 < lo < 0 < hi < 0.01
    # boundaries: all answers moved one way
    assert tango_interval(0, 5, 5)[1] == 1.0 and tango_interval(5, 0, 5)[0] == -1.0
    # nested: the 95% interval contains the 90% one
    lo90, hi90 = tango_interval(3, 9, 40, 0.90)
    lo95, hi95 = tango_interval(3, 9, 40, 0.95)
    assert lo95 < lo90 < hi90 < hi95
    with pytest.raises(ValueError):
        tango_interval(3, 3, 5)


@pytest.mark.parametrize(("b", "c", "n"), [(10, 2, 100), (3, 4, 20), (0, 3, 9), (55, 40, 1000)])
def test_tango_pvalue_at_zero(b, c, n):
    t0 = (c - b) / math.sqrt(b + c)  # at Δ₀ = 0 Tango's statistic is McNemar's z
    assert tango_pvalue(b, c, n) == pytest.approx(2 * (1 - PHI.cdf(abs(t0))), rel=1e-9)
    assert tango_pvalue(0, 0, n) == 1.0


def test_exact_mcnemar_while_few_answers_changed():
    # 1 lost, 4 gained: P(X ≤ 1) for X ~ Binomial(5, 1/2) is 6/32, doubled
    assert mcnemar_exact_pvalue(1, 4) == pytest.approx(12 / 32, rel=1e-12)
    assert mcnemar_exact_pvalue(0, 0) == 1.0 and mcnemar_exact_pvalue(3, 3) == 1.0
    assert paired_proportion_pvalue(1, 4, 50) == mcnemar_exact_pvalue(1, 4)
    assert paired_proportion_pvalue(10, 20, 100) == tango_pvalue(10, 20, 100)  # 30 changed: Tango's


def test_paired_proportion_interval_from_scores():
    base, var = binary_pair(100, lost=10, gained=2, correct=60)
    assert paired_proportion_interval(base, var, 0.95) == tango_interval(10, 2, 100, 0.95)
    with pytest.raises(ValueError):
        paired_proportion_interval([0.5, 1.0], [1.0, 1.0])
