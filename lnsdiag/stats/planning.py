"""How many documents an inconclusive answer would need to become ``dead``.

When a layer's 90% interval is too wide to fit inside the margin, the useful next question is
how many documents a TOST would need, at the spread the pilot run observed, to show |Δ| < margin
with the desired power (normal approximation, Chow, Shao & Wang 2008, §3.2). For 0/1 scores
the spread comes from the discordant counts, and never from a pilot in which nothing changed.
"""

from __future__ import annotations

import math

from .distributions import _NORMAL
from .proportions import _check_counts


def _tost_power(n: int, sd: float, delta: float, margin: float, z: float) -> float:
    """Normal-approximation power of TOST with n documents (Chow, Shao & Wang 2008, §3.2)."""
    r = math.sqrt(n) / sd
    return _NORMAL.cdf((margin - delta) * r - z) + _NORMAL.cdf((margin + delta) * r - z) - 1.0


def documents_needed(sd_d: float, delta: float, margin: float, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Documents a TOST needs to show |Δ| < margin with the given power, at the observed spread.

    Normal approximation with the per-document difference sd ``sd_d`` and true Δ = ``delta``:
    the smallest n with Φ((m − Δ)√n/sd − z₁₋α) + Φ((m + Δ)√n/sd − z₁₋α) − 1 ≥ power. This is
    exact for the approximation (no Δ = 0 special case) and continuous in Δ. None when
    |delta| ≥ margin (equivalence is then out of reach); never below 2.
    """
    if not 0 < alpha < 0.5 or not 0 < power < 1:
        raise ValueError("need 0 < alpha < 0.5 and 0 < power < 1")
    if not math.isfinite(margin) or margin <= 0 or math.isnan(delta) or abs(delta) >= margin:
        return None
    if math.isnan(sd_d):
        raise ValueError("the spread of the per-document differences is unknown (nan)")
    if sd_d <= 0:
        return 2
    n = _smallest_powered_n(sd_d, abs(delta), margin, _NORMAL.inv_cdf(1.0 - alpha), power)
    return None if n is None else max(2, n)


def _smallest_powered_n(sd: float, d: float, margin: float, z: float, power: float) -> int | None:
    """The least n ≥ 1 with TOST power ≥ ``power``: doubling from 2 brackets it, bisection finds it."""
    hi = 2
    while _tost_power(hi, sd, d, margin, z) < power:
        hi *= 2
        if hi > 1 << 62:
            return None
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _tost_power(mid, sd, d, margin, z) >= power:
            hi = mid
        else:
            lo = mid
    return hi


def documents_needed_binary(b: int, c: int, n: int, margin: float, alpha: float = 0.05,
                            power: float = 0.8) -> int | None:
    """:func:`documents_needed` for 0/1 scores from the discordant counts of a pilot run.

    sd² = (b + c)/n − Δ². With no changed answer the observed sd is 0, which would claim almost
    no documents are needed; instead one discordant pair is assumed (sd² = 1/n, Δ = 0), and the
    answer is at least the n at which Tango's (1 − 2α) interval with no changed answer,
    ±z²/(n + z²), fits inside the margin: n > z²(1 − m)/m.
    """
    _check_counts(b, c, n)
    if not 0 < alpha < 0.5:
        raise ValueError("need 0 < alpha < 0.5")
    if margin <= 0:
        return None
    delta, var = _pilot_spread(b, c, n)
    need = documents_needed(math.sqrt(max(var, 0.0)), delta, margin, alpha, power)
    if need is None:
        return None
    return max(need, _no_change_floor(margin, alpha))


def _pilot_spread(b: int, c: int, n: int) -> tuple[float, float]:
    """(Δ, variance of a per-document difference) of a pilot, one discordant pair assumed if none."""
    if b + c == 0:
        return 0.0, 1.0 / n
    delta = (c - b) / n
    return delta, (b + c) / n - delta * delta


def _no_change_floor(margin: float, alpha: float) -> int:
    """Least n at which Tango's (1 − 2α) interval with no changed answer fits inside ±margin."""
    z2 = _NORMAL.inv_cdf(1.0 - alpha) ** 2
    return math.floor(z2 * (1.0 - margin) / margin) + 1 if margin < 1 else 2
