"""Paired difference of two proportions: 0/1 scores of both models on the same documents.

Only the discordant documents carry information: b answered right by the base alone, c by the
variant alone, Δ = (c − b)/n. Tango's score interval (Tango 1998, Stat Med 17:891–908; reviewed
by Newcombe 1998, Stat Med 17:2635–2650) stays honest with few documents and does not collapse
to a point when no answer changed, unlike a t interval on 0/1 differences. The test of Δ = 0 is
McNemar's: exact while few answers changed, Tango's score statistic (McNemar's z) beyond.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .distributions import _NORMAL, _z
from .pairs import is_binary, paired_arrays

#: Below this many changed answers the normal approximation of McNemar's test is too optimistic.
EXACT_BELOW = 25


def discordant_counts(base01: Any, variant01: Any) -> tuple[int, int, int]:
    """(b, c, n): documents right only for the base, right only for the variant, and all documents."""
    b, v = paired_arrays(base01, variant01)
    if not (is_binary(b) and is_binary(v)):
        raise ValueError("Tango's interval needs 0/1 per-document scores")
    return int(np.count_nonzero((b == 1) & (v == 0))), int(np.count_nonzero((b == 0) & (v == 1))), int(b.size)


def _check_counts(b: int, c: int, n: int) -> None:
    """Counts must describe a real paired table."""
    if n < 1 or b < 0 or c < 0 or b + c > n:
        raise ValueError(f"need 0 ≤ b, c and b + c ≤ n ≥ 1; got b={b}, c={c}, n={n}")


def _restricted_q(b: int, c: int, n: int, delta0: float) -> float:
    """Restricted MLE of q_b = P(base right, variant wrong) given q_c − q_b = Δ₀ (Tango 1998, eq. 5).

    The larger root of 2n·q² + (−b − c + (2n − c + b)Δ₀)·q − b·Δ₀(1 − Δ₀) = 0, computed in a
    cancellation-free form and clipped to the feasible range.
    """
    qa = 2.0 * n
    qb = -b - c + (2.0 * n - c + b) * delta0
    qc = -b * delta0 * (1.0 - delta0)
    root = math.sqrt(max(0.0, qb * qb - 4.0 * qa * qc))
    if qb > 0:
        s = -0.5 * (qb + root)
        q = qc / s if s != 0 else 0.0
    else:
        q = (-qb + root) / (2.0 * qa)
    return min(max(q, max(0.0, -delta0)), max(0.0, (1.0 - delta0) / 2.0))


def tango_statistic(b: int, c: int, n: int, delta0: float) -> float:
    """Tango's score statistic T(Δ₀) = (c − b − nΔ₀) / sqrt(n(2q̃ + Δ₀(1 − Δ₀))).

    q̃ is the restricted MLE of the base-only discordant probability; T decreases in Δ₀. At the
    boundaries the variance vanishes: T is 0 when the data sit exactly there, ±inf otherwise.
    """
    _check_counts(b, c, n)
    if not -1.0 <= delta0 <= 1.0:
        raise ValueError(f"Δ₀ must lie in [−1, 1], got {delta0!r}")
    q = _restricted_q(b, c, n, delta0)
    var = n * (2.0 * q + delta0 * (1.0 - delta0))
    num = (c - b) - n * delta0
    scale = max(1.0, float(n)) * 1e-12
    if abs(num) <= scale:
        return 0.0
    if var <= scale * 1e-3:
        return math.copysign(math.inf, num)
    return num / math.sqrt(var)


def tango_interval(b: int, c: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Tango's score interval for Δ = (c − b)/n: every Δ₀ with |T(Δ₀)| ≤ z.

    Found by bisection on each side of the estimate (T is monotone in Δ₀). With no changed
    answer it is ±z²/(n + z²), so 5 documents cannot show equivalence within 1 point.
    """
    _check_counts(b, c, n)
    z = _z(level)
    est = (c - b) / n
    upper = 1.0 if tango_statistic(b, c, n, 1.0) >= -z else _tango_crossing(b, c, n, -z, est, 1.0)
    lower = -1.0 if tango_statistic(b, c, n, -1.0) <= z else _tango_crossing(b, c, n, z, -1.0, est)
    return lower, upper


def _tango_crossing(b: int, c: int, n: int, target: float, lo: float, hi: float) -> float:
    """The Δ₀ in [lo, hi] where T(Δ₀) = target, by bisection (T decreasing; T − target changes sign)."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if tango_statistic(b, c, n, mid) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-14:
            break
    return 0.5 * (lo + hi)


def tango_pvalue(b: int, c: int, n: int) -> float:
    """Two-sided p-value of Δ = 0 from Tango's statistic: 2(1 − Φ(|T(0)|)) (T(0) is McNemar's z)."""
    t0 = tango_statistic(b, c, n, 0.0)
    return float(min(1.0, 2.0 * (1.0 - _NORMAL.cdf(abs(t0)))))


def mcnemar_exact_pvalue(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: conditional on b + c changed answers, each is a lost one
    with probability 1/2 under Δ = 0; p = min(1, 2·P(X ≤ min(b, c))), X ~ Binomial(b + c, 1/2)."""
    m = b + c
    if m == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2.0 ** m
    return float(min(1.0, 2.0 * tail))


def paired_proportion_pvalue(b: int, c: int, n: int) -> float:
    """p-value of Δ = 0 for 0/1 scores: exact McNemar when few answers changed, else Tango's."""
    return mcnemar_exact_pvalue(b, c) if b + c < EXACT_BELOW else tango_pvalue(b, c, n)


def no_change_halfwidth(n: int, level: float) -> float:
    """Half-width of Tango's interval when nothing changed, z²/(n + z²): the least a sample of
    n documents can rule out. Used as a floor when per-document differences are all zero, so a
    handful of identical documents never proves equivalence."""
    z = _z(level)
    return z * z / (n + z * z) if n > 0 else math.inf


def paired_proportion_interval(base01: Any, variant01: Any, level: float = 0.95) -> tuple[float, float]:
    """Tango's interval for mean(variant01) − mean(base01) from aligned 0/1 scores."""
    return tango_interval(*discordant_counts(base01, variant01), level=level)
