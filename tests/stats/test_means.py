"""Paired means and lm-eval groups against sums written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lnsdiag.stats import mean_interval, paired_mean, pooled_group


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
