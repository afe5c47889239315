"""The normal and Student t distributions, without scipy.

Intervals and tests of a paired Δ need t quantiles and tail probabilities for any (possibly
fractional, Welch–Satterthwaite) degrees of freedom. They come from the regularized incomplete
beta function, evaluated by its continued fraction (DLMF §8.17.22) with the modified Lentz
method; the normal distribution is the standard library's.
"""

from __future__ import annotations

import math
from statistics import NormalDist

_NORMAL = NormalDist()
# Above this many degrees of freedom the t and normal quantiles agree to < 1e-7 relative.
_T_NORMAL_DF = 1e7
# Lentz's method replaces exact zeros by this, so that no step divides by zero.
_TINY = 1e-300


def _alpha(level: float) -> float:
    """1 − level, after checking the level is a probability strictly between 0 and 1."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie strictly between 0 and 1, got {level!r}")
    return 1.0 - level


def _z(level: float) -> float:
    """Two-sided standard normal critical value for a confidence level."""
    return _NORMAL.inv_cdf(1.0 - _alpha(level) / 2.0)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by the continued fraction of DLMF 8.17.22.

    The fraction converges fast for x < (a + 1)/(a + b + 2); otherwise the symmetry
    I_x(a, b) = 1 − I_{1−x}(b, a) is used.
    """
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    return math.exp(log_front) / a * _continued_fraction(a, b, x)


def _continued_fraction(a: float, b: float, x: float) -> float:
    """Modified Lentz evaluation of 1/(1 + d1/(1 + d2/(1 + ...))), stopped when a step changes < 1e-15."""
    f = _TINY
    c = f
    d = 0.0
    for j in range(1, 200_000):
        num = _fraction_term(a, b, x, j)
        d = _away_from_zero(1.0 + num * d)
        c = _away_from_zero(1.0 + num / c)
        d = 1.0 / d
        step = c * d
        f *= step
        if abs(step - 1.0) < 1e-15:
            break
    return f


def _fraction_term(a: float, b: float, x: float, j: int) -> float:
    """The j-th numerator of the fraction: 1, then d_{j−1} of DLMF 8.17.22 (even and odd forms)."""
    if j == 1:
        return 1.0
    k = j - 1  # index of d_k
    m = k // 2
    if k % 2 == 0:
        return m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m))
    return -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))


def _away_from_zero(value: float) -> float:
    """``value``, or the tiny floor when it is closer to zero than that (Lentz's guard)."""
    return _TINY if abs(value) < _TINY else value


def student_t_sf(t: float, df: float) -> float:
    """Upper tail P(T > t) of Student's t with ``df`` (possibly fractional) degrees of freedom."""
    if math.isnan(t) or math.isnan(df) or df <= 0:
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    if df > _T_NORMAL_DF:
        return 1.0 - _NORMAL.cdf(t)
    t2 = t * t
    # P(|T| > |t|) = I_{df/(df+t²)}(df/2, 1/2); the complement form avoids cancellation near t = 0.
    two_sided = 1.0 - _betainc(0.5, df / 2.0, t2 / (df + t2)) if t2 < df else _betainc(df / 2.0, 0.5, df / (df + t2))
    half = 0.5 * two_sided
    return half if t >= 0 else 1.0 - half


def student_t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t by bisection on :func:`student_t_sf` (relative error < 1e-8 for any df)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability must lie strictly between 0 and 1, got {p!r}")
    if math.isnan(df) or df <= 0:
        return math.nan
    if df > _T_NORMAL_DF:
        return _NORMAL.inv_cdf(p)
    if p == 0.5:
        return 0.0
    tail = 1.0 - p if p > 0.5 else p  # upper-tail probability of |quantile|
    q = _upper_t_point(tail, df, max(1.0, abs(_NORMAL.inv_cdf(p))))
    return q if p > 0.5 else -q


def _upper_t_point(tail: float, df: float, start: float) -> float:
    """The t > 0 with P(T > t) = tail: double ``start`` until it brackets t, then bisect."""
    lo, hi = 0.0, start
    while student_t_sf(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_sf(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)
