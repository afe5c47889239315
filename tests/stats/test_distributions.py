"""Student t without scipy: tables, the quantile inverting the tail, and scipy where installed."""

from __future__ import annotations

from statistics import NormalDist

import pytest

from lnsdiag.stats import student_t_quantile, student_t_sf

PHI = NormalDist()


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
