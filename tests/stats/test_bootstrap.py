"""Paired bootstraps against plain loops over numpy's generator, closed forms and sklearn."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from lnsdiag.stats import (
    BootstrapEstimate,
    binary_pairs,
    bootstrap,
    mean_interval,
    mean_pvalue,
    paired_bootstrap,
    paired_bootstrap_confusion,
    paired_bootstrap_ratio,
)


def weighted_perplexity(items):
    """lm-eval style word perplexity over (loglikelihood, words) pairs."""
    ll = sum(x for x, _ in items)
    words = sum(w for _, w in items)
    return math.exp(-ll / words)


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
    monkeypatch.setattr(bootstrap, "_CHUNK_ELEMENTS", 50)  # one or two rows per block
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


@pytest.mark.parametrize("score", ["f1", "matthews_corrcoef"])
def test_confusion_bootstrap_equals_sklearn_draw_for_draw(score):
    """f1 and mcc from confusion counts: the same draws as running lm-eval's sklearn aggregation per resample."""
    from lm_eval.api.registry import get_aggregation

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
