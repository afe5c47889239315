"""From intervals of Δ to a verdict per layer, and p-values adjusted across layers.

A layer is ``dead`` when its Δ is shown equivalent to zero within a margin: both one-sided tests
of TOST reject at α = 0.05, i.e. the 90% interval lies inside (−margin, +margin) (Schuirmann
1987, J Pharmacokinet Biopharm 15:657). Otherwise it ``hurts`` or ``helps`` when Δ ≠ 0 is
significant, and is ``inconclusive`` when the documents cannot tell. Testing every layer of one
metric is many tests at once: :func:`holm` adjusts their p-values (Holm 1979, Scand J Stat 6:65).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

VERDICTS = ("dead", "hurts", "helps", "inconclusive")


def relative_to_absolute(margin_rel: float, baseline: float) -> float:
    """An equivalence margin given as a fraction of the baseline (perplexity: 0.01 = 1%) in Δ units.

    :func:`verdict` works on Δ in the metric's own units, so a relative margin is scaled once
    here: |margin_rel × baseline|.
    """
    return abs(float(margin_rel) * float(baseline))


def verdict(lo90: float, hi90: float, lo95: float, hi95: float, margin: float, higher_is_better: bool, *,
            p_adjusted: float | None = None, delta: float = math.nan, alpha: float = 0.05) -> str:
    """dead, hurts, helps or inconclusive from two intervals of Δ = variant − baseline.

    ``margin`` is absolute, in Δ's units (scale a relative margin with :func:`relative_to_absolute`).
    dead: the 90% interval lies strictly inside (−margin, +margin), i.e. both one-sided tests of
    TOST reject at α = 0.05 (Schuirmann 1987). Otherwise hurts / helps when Δ ≠ 0 is significant
    on the worse / better side (worse means Δ < 0, or Δ > 0 for lower-is-better metrics such as
    perplexity): by the 95% interval excluding 0, or, given ``p_adjusted`` (a multiplicity-adjusted
    p-value, e.g. :func:`holm`), by ``p_adjusted < alpha`` with the side of the estimate ``delta``.
    Else inconclusive. NaN bounds never prove anything.
    """
    if margin > 0 and -margin < lo90 <= hi90 < margin:
        return "dead"
    if p_adjusted is None:
        worse_side, better_side = _interval_sides(lo95, hi95, higher_is_better)
    else:
        worse_side, better_side = _pvalue_sides(p_adjusted, delta, alpha, higher_is_better)
    if worse_side:
        return "hurts"
    if better_side:
        return "helps"
    return "inconclusive"


def _interval_sides(lo95: float, hi95: float, higher_is_better: bool) -> tuple[bool, bool]:
    """(worse, better): whether the 95% interval lies wholly on the worse or the better side of 0."""
    worse_side = hi95 < 0 if higher_is_better else lo95 > 0
    better_side = lo95 > 0 if higher_is_better else hi95 < 0
    return worse_side, better_side


def _pvalue_sides(p_adjusted: float, delta: float, alpha: float, higher_is_better: bool) -> tuple[bool, bool]:
    """(worse, better): a significant adjusted p-value, on the side of the estimate Δ."""
    significant = math.isfinite(p_adjusted) and p_adjusted < alpha
    worse_side = significant and (delta < 0 if higher_is_better else delta > 0)
    better_side = significant and not worse_side
    return worse_side, better_side


def holm(pvalues: Any) -> np.ndarray:
    """Holm–Bonferroni step-down adjusted p-values (Holm 1979), in the input order.

    The k-th smallest of m p-values becomes max_{j≤k} min(1, (m − j + 1)·p_(j)): monotone in the
    raw p-values and ≤ 1. NaN entries stay NaN and do not count towards m.
    """
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out
