"""The verdict rule on known truths, and Holm's adjustment by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lnsdiag.stats import delta_interval, holm, paired_bootstrap_ratio, relative_to_absolute, tango_interval, verdict
from tests.stats.synthetic import binary_pair


def both_intervals(b, c, n):
    """Tango 90% and 95% intervals, flattened for verdict()."""
    return (*tango_interval(b, c, n, 0.90), *tango_interval(b, c, n, 0.95))


def test_eight_point_drop_at_100_documents_hurts():
    base, var = binary_pair(100, lost=10, gained=2, correct=60)
    assert base.mean() == pytest.approx(0.60) and var.mean() == pytest.approx(0.52)
    assert verdict(*both_intervals(10, 2, 100), margin=0.01, higher_is_better=True) == "hurts"
    assert verdict(*delta_interval(base, var, 0.9), *delta_interval(base, var, 0.95), 0.01, True) == "hurts"


def test_no_change_on_10000_documents_is_dead():
    rng = np.random.default_rng(12)
    base = (rng.random(10_000) < 0.6).astype(float)
    ivals = (*delta_interval(base, base.copy(), 0.9), *delta_interval(base, base.copy(), 0.95))
    assert verdict(*ivals, margin=0.01, higher_is_better=True) == "dead"


def test_no_change_on_20_documents_is_inconclusive():
    assert verdict(*both_intervals(0, 0, 20), margin=0.01, higher_is_better=True) == "inconclusive"


def test_five_unchanged_documents_never_prove_equivalence():
    for correct in range(6):
        base = np.array([1.0] * correct + [0.0] * (5 - correct))
        ivals = (*delta_interval(base, base, 0.9), *delta_interval(base, base, 0.95))
        assert verdict(*ivals, margin=0.01, higher_is_better=True) != "dead"


def test_small_perplexity_change_with_tight_paired_se_is_dead():
    rng = np.random.default_rng(13)
    n = 300
    tokens = rng.integers(256, 1025, n).astype(float)
    base_nll = tokens * rng.normal(2.6, 0.4, n)  # windows differ a lot in difficulty ...
    var_nll = base_nll + 0.002 * tokens + rng.normal(0, 0.02, n) * np.sqrt(tokens)  # ... the change is tiny
    boot = paired_bootstrap_ratio(base_nll, tokens, var_nll, tokens, np.exp, iters=5000, seed=14)
    base_ppl = math.exp(base_nll.sum() / tokens.sum())
    assert boot.delta / base_ppl == pytest.approx(0.002, rel=0.05)  # a 0.2% change
    margin = relative_to_absolute(0.01, base_ppl)
    assert margin == pytest.approx(0.01 * base_ppl)
    assert verdict(*boot.interval(0.9), *boot.interval(0.95), margin=margin, higher_is_better=False) == "dead"


def test_verdict_rules():
    assert verdict(-0.005, 0.004, -0.006, 0.005, 0.01, True) == "dead"
    assert verdict(-0.05, -0.02, -0.06, -0.01, 0.01, True) == "hurts"
    assert verdict(0.02, 0.05, 0.01, 0.06, 0.01, True) == "helps"
    assert verdict(0.02, 0.05, 0.01, 0.06, 0.01, False) == "hurts"  # lower is better: Δ > 0 is worse
    assert verdict(-0.05, -0.02, -0.06, -0.01, 0.01, False) == "helps"
    assert verdict(-0.05, 0.02, -0.06, 0.03, 0.01, True) == "inconclusive"
    assert verdict(-0.01, 0.005, -0.02, 0.01, 0.01, True) == "inconclusive"  # touching the margin is not inside
    assert verdict(math.nan, math.nan, math.nan, math.nan, 0.01, True) == "inconclusive"


def test_verdict_with_an_adjusted_pvalue_ignores_the_95_interval():
    wide = (-0.05, 0.02, -0.06, 0.03, 0.01)  # the 95% interval alone would be inconclusive
    assert verdict(*wide, True, p_adjusted=0.01, delta=-0.02) == "hurts"
    assert verdict(*wide, False, p_adjusted=0.01, delta=-0.02) == "helps"
    assert verdict(*wide, True, p_adjusted=0.2, delta=-0.02) == "inconclusive"
    assert verdict(*wide, True, p_adjusted=math.nan, delta=-0.02) == "inconclusive"
    assert verdict(-0.005, 0.004, -0.06, -0.01, 0.01, True, p_adjusted=0.001, delta=-0.001) == "dead"  # TOST first


def test_holm_by_hand():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → running max 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])
    np.testing.assert_allclose(holm([0.01, math.nan, 0.02]), [0.02, math.nan, 0.02])
    raw = np.random.default_rng(15).random(30) ** 3
    adj = holm(raw)
    assert np.all(adj >= raw) and np.all(adj <= 1)
    order = np.argsort(raw)
    assert np.all(np.diff(adj[order]) >= 0)
