"""Intervals and p-values of Δ: Student t on the paired SE, Tango's for 0/1 scores."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from lnsdiag.stats import (
    PairedEstimate,
    delta_interval,
    delta_pvalue,
    mean_interval,
    mean_pvalue,
    paired_mean,
    tango_interval,
    tango_pvalue,
)
from tests.stats.synthetic import binary_pair

PHI = NormalDist()


def test_mean_interval_and_pvalue_use_t():
    est = PairedEstimate(delta=0.5, se=0.1, n=11, sd=0.1 * math.sqrt(11))
    lo, hi = mean_interval(est, 0.95)
    assert lo == pytest.approx(0.5 - 2.2281388520 * 0.1, rel=1e-9)
    assert hi == pytest.approx(0.5 + 2.2281388520 * 0.1, rel=1e-9)
    # closed forms of the t tail: df = 2 gives P(|T| > t) = 1 − t/√(2 + t²), df = 1 (Cauchy) 1 − 2·atan(t)/π
    assert mean_pvalue(PairedEstimate(0.5, 0.1, 3, 0.17)) == pytest.approx(1 - 5 / math.sqrt(27), rel=1e-9)
    assert mean_pvalue(PairedEstimate(-0.3, 0.1, 2, 0.1)) == pytest.approx(1 - 2 * math.atan(3) / math.pi, rel=1e-9)
    huge = PairedEstimate(delta=0.0, se=1.0, n=10**9, sd=1.0)
    assert mean_interval(huge, 0.95)[1] == pytest.approx(PHI.inv_cdf(0.975), rel=1e-7)
    assert mean_pvalue(PairedEstimate(0.0, 0.0, 10, 0.0)) == 1.0


def test_paired_t_pvalue_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    base = rng.normal(size=40)
    var = base + rng.normal(0.3, 1.0, size=40)
    assert mean_pvalue(paired_mean(base, var)) == pytest.approx(scipy_stats.ttest_rel(var, base).pvalue, rel=1e-8)


def test_binary_scores_get_tangos_interval_and_test():
    base, var = binary_pair(100, lost=10, gained=2, correct=60)
    assert delta_interval(base, var, 0.95) == tango_interval(10, 2, 100, 0.95)
    assert delta_pvalue(base, var) == tango_pvalue(10, 2, 100)
