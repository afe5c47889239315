"""lnsdiag.stats against brute force, hand computations and independent re-derivations.

Nothing here reuses the module's own helpers to compute an expected value: SEs come from
explicit sums, bootstrap draws from plain loops over numpy's generator, Tango's restricted MLE
from a direct numerical maximisation of the constrained likelihood, t quantiles from tables
(and scipy when it happens to be installed).
"""

from __future__ import annotations

import itertools
import math
from statistics import NormalDist

import numpy as np
import pytest

from lnsdiag import stats
from lnsdiag.stats import (
    BootstrapEstimate,
    PairedEstimate,
    delta_interval,
    delta_pvalue,
    documents_needed,
    documents_needed_binary,
    holm,
    mean_interval,
    mean_pvalue,
    paired_bootstrap,
    paired_bootstrap_ratio,
    paired_mean,
    paired_proportion_interval,
    pooled_group,
    relative_to_absolute,
    student_t_quantile,
    student_t_sf,
    tango_interval,
    tango_pvalue,
    tango_statistic,
    verdict,
)

PHI = NormalDist()


def weighted_perplexity(items):
    """lm-eval style word perplexity over (loglikelihood, words) pairs."""
    ll = sum(x for x, _ in items)
    words = sum(w for _, w in items)
    return math.exp(-ll / words)


def both_intervals(b, c, n):
    """Tango 90% and 95% intervals, flattened for verdict()."""
    return (*tango_interval(b, c, n, 0.90), *tango_interval(b, c, n, 0.95))


def binary_pair(n, lost, gained, correct):
    """Aligned 0/1 scores: `correct` base answers right; the variant loses `lost` and gains `gained`."""
    base = np.zeros(n)
    base[:correct] = 1
    var = base.copy()
    var[:lost] = 0
    var[correct:correct + gained] = 1
    return base, var


# ---------------------------------------------------------------------------------------------
# paired means and groups


def test_paired_mean_matches_brute_force():
    rng = np.random.default_rng(1)
    n = 257
    difficulty = rng.normal(size=n)
    base = difficulty + rng.normal(scale=0.3, size=n)
    var = difficulty + 0.1 + rng.normal(scale=0.3, size=n)
    est = paired_mean(base, var)

    diffs = [v - b for b, v in zip(base.tolist(), var.tolist(), strict=True)]
    mean_d = sum(diffs) / n
    sd = math.sqrt(sum((d - mean_d) ** 2 for d in diffs) / (n - 1))
    assert est.n == n
    assert est.delta == pytest.approx(sum(var.tolist()) / n - sum(base.tolist()) / n, abs=1e-12)
    assert est.sd == pytest.approx(sd, rel=1e-12)
    assert est.se == pytest.approx(sd / math.sqrt(n), rel=1e-12)
    # pairing matters: the unpaired SE is much larger here
    unpaired = math.sqrt(base.var(ddof=1) / n + var.var(ddof=1) / n)
    assert est.se < 0.5 * unpaired


def test_paired_mean_edge_cases():
    one = paired_mean([0.3], [0.5])
    assert one.delta == pytest.approx(0.2) and math.isnan(one.se) and one.n == 1
    assert mean_interval(one, 0.95) == (pytest.approx(math.nan, nan_ok=True),) * 2
    with pytest.raises(ValueError):
        paired_mean([1, 2, 3], [1, 2])
    with pytest.raises(ValueError):
        paired_mean([], [])


def test_pooled_group_size_weighted_and_unweighted():
    rng = np.random.default_rng(2)
    parts = []
    for size, flip in ((5, 0.4), (17, 0.1), (40, 0.25)):
        base = rng.integers(0, 2, size).astype(float)
        var = np.where(rng.random(size) < flip, 1 - base, base)
        parts.append((base, var))

    # size-weighted by hand: pool every document
    all_b = [x for b, _ in parts for x in b.tolist()]
    all_v = [x for _, v in parts for x in v.tolist()]
    N = len(all_b)
    d = [v - b for b, v in zip(all_b, all_v, strict=True)]
    md = sum(d) / N
    sd = math.sqrt((sum(x * x for x in d) - N * md * md) / (N - 1))
    w = pooled_group(parts, weight_by_size=True)
    assert w.n == N
    assert w.delta == pytest.approx(sum(all_v) / N - sum(all_b) / N, abs=1e-12)
    assert w.se == pytest.approx(sd / math.sqrt(N), rel=1e-10)

    # mean of subtask means by hand
    deltas, ses = [], []
    for b, v in parts:
        dd = (v - b).tolist()
        m = sum(dd) / len(dd)
        deltas.append(sum(v.tolist()) / len(dd) - sum(b.tolist()) / len(dd))
        ses.append(math.sqrt(sum((x - m) ** 2 for x in dd) / (len(dd) - 1) / len(dd)))
    u = pooled_group(parts, weight_by_size=False)
    assert u.delta == pytest.approx(sum(deltas) / 3, abs=1e-12)
    assert u.se == pytest.approx(math.sqrt(sum(s * s for s in ses)) / 3, rel=1e-10)
    assert 1 <= u.dof <= N - 1


# ---------------------------------------------------------------------------------------------
# Student t


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [  # standard t tables
        (0.975, 1, 12.7062047362),
        (0.975, 10, 2.2281388520),
        (0.95, 4, 2.1318467863),
        (0.995, 30, 2.7499956536),
        (0.9, 2, 1.8856180832),
        (0.025, 10, -2.2281388520),
    ],
)
def test_t_quantile_table(p, df, expected):
    assert student_t_quantile(p, df) == pytest.approx(expected, rel=1e-9)


def test_t_quantile_inverts_sf_and_matches_scipy():
    for df in (1, 1.5, 3, 7.25, 29, 200, 5000, 1e6):
        for p in (0.55, 0.9, 0.95, 0.975, 0.999):
            q = student_t_quantile(p, df)
            assert student_t_sf(q, df) == pytest.approx(1 - p, rel=1e-7)
    assert student_t_quantile(0.975, 1e9) == pytest.approx(PHI.inv_cdf(0.975), rel=1e-8)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2.5, 9, 60, 1e4):
        for p in (0.6, 0.95, 0.975, 0.9995):
            assert student_t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-8)
        for t in (0.0, 0.3, 2.0, 8.0):
            assert student_t_sf(t, df) == pytest.approx(scipy_stats.t.sf(t, df), rel=1e-8, abs=1e-15)


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


# ---------------------------------------------------------------------------------------------
# bootstrap


def test_paired_bootstrap_equals_brute_force_loop():
    rng = np.random.default_rng(4)
    n, iters, seed = 37, 400, 123
    words = rng.integers(5, 60, n)
    base = [(float(-w * rng.uniform(1, 3)), int(w)) for w in words]
    var = [(ll * rng.uniform(0.95, 1.1), w) for ll, w in base]
    est = paired_bootstrap(base, var, weighted_perplexity, iters=iters, seed=seed)

    gen = np.random.default_rng(seed)
    expect = []
    for _ in range(iters):
        idx = gen.integers(0, n, size=n)
        expect.append(weighted_perplexity([var[i] for i in idx]) - weighted_perplexity([base[i] for i in idx]))
    expect = np.array(expect)
    np.testing.assert_allclose(est.draws, expect, rtol=1e-12, atol=1e-12)
    assert est.delta == pytest.approx(weighted_perplexity(var) - weighted_perplexity(base), rel=1e-12)
    assert est.se == pytest.approx(expect.std(ddof=1), rel=1e-10)
    assert est.n == n
    # same seed, same draws
    again = paired_bootstrap(base, var, weighted_perplexity, iters=iters, seed=seed)
    np.testing.assert_array_equal(again.draws, est.draws)


def test_bootstrap_blocks_do_not_change_draws(monkeypatch):
    rng = np.random.default_rng(5)
    num, den = rng.uniform(1, 2, 31), rng.integers(1, 9, 31).astype(float)
    ref = paired_bootstrap_ratio(num, den, num * 1.01, den, np.exp, iters=300, seed=9)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 50)  # one or two rows per block
    small = paired_bootstrap_ratio(num, den, num * 1.01, den, np.exp, iters=300, seed=9)
    np.testing.assert_allclose(small.draws, ref.draws, rtol=1e-13)


def test_ratio_bootstrap_equals_brute_force_loop():
    rng = np.random.default_rng(6)
    n, iters, seed = 50, 300, 7
    bn, den = rng.uniform(50, 150, n), rng.integers(30, 90, n).astype(float)
    vn = bn * rng.uniform(0.98, 1.05, n)
    est = paired_bootstrap_ratio(bn, den, vn, den, np.exp, iters=iters, seed=seed)
    gen = np.random.default_rng(seed)
    expect = []
    for _ in range(iters):
        idx = gen.integers(0, n, size=n)
        expect.append(math.exp(vn[idx].sum() / den[idx].sum()) - math.exp(bn[idx].sum() / den[idx].sum()))
    np.testing.assert_allclose(est.draws, expect, rtol=1e-10)
    assert est.delta == pytest.approx(math.exp(vn.sum() / den.sum()) - math.exp(bn.sum() / den.sum()), rel=1e-12)


def _windows(n, rng):
    """Synthetic perplexity data: per-document negative loglikelihoods and word counts."""
    words = rng.integers(20, 200, n).astype(float)
    base_nll = words * rng.gamma(8.0, 0.3, n)
    var_nll = base_nll * rng.normal(1.03, 0.05, n)
    return base_nll, var_nll, words


def test_ratio_fast_path_agrees_with_generic_bootstrap():
    rng = np.random.default_rng(8)
    base_nll, var_nll, words = _windows(120, rng)
    base_items = [(-x, w) for x, w in zip(base_nll, words, strict=True)]
    var_items = [(-x, w) for x, w in zip(var_nll, words, strict=True)]

    # same seed: the same resamples, so the same draws
    fast = paired_bootstrap_ratio(base_nll, words, var_nll, words, np.exp, iters=1000, seed=11)
    slow = paired_bootstrap(base_items, var_items, weighted_perplexity, iters=1000, seed=11)
    np.testing.assert_allclose(fast.draws, slow.draws, rtol=1e-9)
    assert fast.delta == pytest.approx(slow.delta, rel=1e-12)

    # different seeds: agreement within Monte-Carlo error at 20k iterations
    fast = paired_bootstrap_ratio(base_nll, words, var_nll, words, np.exp, iters=20_000, seed=1)
    slow = paired_bootstrap(base_items, var_items, weighted_perplexity, iters=20_000, seed=2)
    assert fast.se == pytest.approx(slow.se, rel=0.05)
    for level in (0.9, 0.95):
        for a, b in zip(fast.interval(level), slow.interval(level), strict=True):
            assert a == pytest.approx(b, abs=0.1 * slow.se)


def test_bootstrap_se_of_a_mean_matches_closed_form():
    rng = np.random.default_rng(9)
    n = 400
    base = rng.normal(size=n)
    var = base + rng.normal(0.05, 0.4, n)
    closed = var.__sub__(base).std(ddof=1) / math.sqrt(n)
    ones = np.ones(n)
    boot = paired_bootstrap_ratio(base, ones, var, ones, None, iters=20_000, seed=10)
    assert boot.delta == pytest.approx(var.mean() - base.mean(), abs=1e-12)
    assert boot.se == pytest.approx(closed, rel=0.05)
    generic = paired_bootstrap(base.tolist(), var.tolist(), lambda xs: sum(xs) / len(xs), iters=3000, seed=10)
    assert generic.se == pytest.approx(closed, rel=0.05)


def test_bootstrap_interval_and_pvalue():
    draws = np.linspace(0.001, 1.0, 1000)
    est = BootstrapEstimate(delta=0.5, se=float(draws.std(ddof=1)), n=10, draws=draws)
    lo, hi = est.interval(0.9)
    assert lo == pytest.approx(np.quantile(draws, 0.05)) and hi == pytest.approx(np.quantile(draws, 0.95))
    assert est.pvalue() == pytest.approx(1 / 1000)  # every draw > 0: clipped at 1/iters
    half = BootstrapEstimate(0.0, 1.0, 10, np.linspace(-1, 1, 1001))
    assert mean_pvalue(half) == pytest.approx(1.0)
    assert mean_interval(half, 0.95) == half.interval(0.95)
    zero = BootstrapEstimate(0.0, 0.0, 10, np.zeros(100))
    assert zero.pvalue() == 1.0


# ---------------------------------------------------------------------------------------------
# Tango's score interval, re-derived independently


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


def test_paired_proportion_interval_from_scores():
    base, var = binary_pair(100, lost=10, gained=2, correct=60)
    assert paired_proportion_interval(base, var, 0.95) == tango_interval(10, 2, 100, 0.95)
    assert delta_interval(base, var, 0.95) == tango_interval(10, 2, 100, 0.95)
    assert delta_pvalue(base, var) == tango_pvalue(10, 2, 100)
    with pytest.raises(ValueError):
        paired_proportion_interval([0.5, 1.0], [1.0, 1.0])


# ---------------------------------------------------------------------------------------------
# verdicts: the known truths


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


# ---------------------------------------------------------------------------------------------
# multiplicity and planning


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


def test_documents_needed():
    z_a, z_half_b, z_b = PHI.inv_cdf(0.95), PHI.inv_cdf(0.9), PHI.inv_cdf(0.8)
    # Δ = 0: power 2Φ(m√n/sd − z) − 1 = 0.8 gives n = ((z₀.₉₅ + z₀.₉)·sd/m)² exactly
    assert documents_needed(0.3, 0.0, 0.01) == math.ceil(((z_a + z_half_b) * 0.3 / 0.01) ** 2)
    # Δ far from 0: the textbook one-sided formula ((z₀.₉₅ + z₀.₈)·sd/(m − |Δ|))²
    assert documents_needed(0.3, 0.006, 0.01) == pytest.approx(((z_a + z_b) * 0.3 / 0.004) ** 2, rel=0.01)
    needs = [documents_needed(0.3, 0.002, m) for m in (0.005, 0.01, 0.02, 0.05, 0.1)]
    assert all(a >= b for a, b in itertools.pairwise(needs))
    assert documents_needed(0.3, 0.02, 0.01) is None
    assert documents_needed(0.3, -0.01, 0.01) is None
    assert documents_needed(0.0, 0.0, 0.01) == 2
    assert documents_needed(0.3, 0.0, 0.01, power=0.9) > documents_needed(0.3, 0.0, 0.01, power=0.8)


def test_documents_needed_binary_never_zero_for_tiny_samples():
    z2 = PHI.inv_cdf(0.95) ** 2
    for n in (1, 5, 20, 100):
        need = documents_needed_binary(0, 0, n, 0.01)
        assert need is not None and need > max(n, 2)
        assert need >= z2 * 0.99 / 0.01  # Tango's 90% interval with no change fits inside ±1 point
    # with changed answers the spread comes from the discordant rate
    b, c, n = 4, 6, 200
    delta = (c - b) / n
    assert documents_needed_binary(b, c, n, 0.05) == documents_needed(math.sqrt((b + c) / n - delta**2), delta, 0.05)
    needs = [documents_needed_binary(0, 0, 20, m) for m in (0.005, 0.01, 0.02, 0.05)]
    assert all(a >= b for a, b in itertools.pairwise(needs))
    assert documents_needed_binary(10, 2, 100, 0.05) is None  # |Δ| = 0.08 ≥ margin


def test_margins_of_metrics_on_a_0_to_100_scale():
    """BLEU, chrF, TER and TruthfulQA's ROUGE are reported ×100 by lm-eval: the margin follows, unless named."""
    from lnsdiag.results.verdict import Margins

    default = Margins.parse(None)
    assert default.of("bleu", 20.0) == 1.0 and default.of("chrf[none]", 40.0) == 1.0
    assert default.of("rouge1_max", 40.0) == 1.0 and default.of("bleu_diff", -2.0) == 1.0
    assert default.of("bleu_acc", 0.4) == 0.01  # a 0/1 score stays on its scale
    assert Margins.parse("0.02").of("ter", 60.0) == 2.0
    assert Margins.parse("bleu=0.5").of("bleu", 20.0) == 0.5  # a named margin is taken as given
    assert "points" in default.describe()


def test_chance_level_of_a_group_follows_its_weighting():
    """A group of a 2-choice leaf (4 documents) and a 4-choice leaf (1 document): pooled over documents,
    chance is (4 × 1/2 + 1/4) / 5 = 0.45; as the mean of the leaf means (unweighted groups), (1/2 + 1/4) / 2."""
    from lnsdiag.results.store import VariantResult
    from lnsdiag.results.verdict import chance_level, prune_frame
    from lnsdiag.scoring.base import MetricRow

    items = {"a": {i: float(i % 2) for i in range(4)}, "b": {0: 1.0}}  # leaf means 0.5 and 1.0; pooled 0.6
    choices = {"a": dict.fromkeys(range(4), 2), "b": {0: 4}}

    def result(layer, group_value):
        rows = [MetricRow("a", "acc", 0.5, 0.1, True), MetricRow("b", "acc", 1.0, 0.0, True),
                MetricRow("g", "acc", group_value, 0.1, True, group=True)]
        return VariantResult(layer, rows, 1.0, documents={(leaf, "acc"): docs for leaf, docs in items.items()},
                             choices=choices, aggregations={("a", "acc"): "mean", ("b", "acc"): "mean"},
                             groups={"g": ["a", "b"]})

    assert chance_level(result(None, 0.6), "g", "acc") == pytest.approx(0.45)
    assert chance_level(result(None, 0.75), "g", "acc", "means") == pytest.approx(0.375)
    for value, chance in ((0.6, 0.45), (0.75, 0.375)):
        frame = prune_frame({None: result(None, value), 1: result(1, value)})
        assert frame.set_index(["variant", "task"]).loc[("layer_001", "g"), "chance"] == pytest.approx(chance)


@pytest.mark.parametrize("score", ["f1", "matthews_corrcoef"])
def test_confusion_bootstrap_equals_sklearn_draw_for_draw(score):
    """f1 and mcc from confusion counts: the same draws as running lm-eval's sklearn aggregation per resample."""
    import warnings

    from lm_eval.api.registry import get_aggregation

    from lnsdiag.stats import binary_pairs, paired_bootstrap, paired_bootstrap_confusion

    rng = np.random.default_rng(3)
    gold = rng.integers(0, 2, 40)
    base = [(int(g), int(g if rng.random() < 0.8 else 1 - g)) for g in gold]
    variant = [(g, p if rng.random() < 0.85 else 1 - p) for g, p in base]
    variant[:3] = [(0, 0)] * 3  # some resamples miss a class: sklearn's 0 when undefined
    fast = paired_bootstrap_confusion(binary_pairs(base), binary_pairs(variant), score, iters=300, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slow = paired_bootstrap(base, variant, get_aggregation(score), iters=300, seed=7)
    assert fast.delta == pytest.approx(slow.delta, abs=1e-12)
    np.testing.assert_allclose(fast.draws, slow.draws, atol=1e-12)
    assert binary_pairs([(0, 2)]) is None and binary_pairs(["ab"]) is None
