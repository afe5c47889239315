"""Confidence intervals and p-values of Δ, whatever estimate it came from.

A paired mean gets Student's t on its paired SE (``estimate.dof`` degrees of freedom), a
bootstrap its percentile interval and tail proportion, and aligned 0/1 scores Tango's interval
and score test: each caller asks one function and the right method answers.
"""

from __future__ import annotations

import math
from typing import Any

from .bootstrap import BootstrapEstimate
from .distributions import _alpha, student_t_quantile, student_t_sf
from .means import PairedEstimate, paired_mean
from .pairs import is_binary
from .proportions import discordant_counts, paired_proportion_interval, tango_pvalue


def mean_interval(estimate: PairedEstimate | BootstrapEstimate, level: float = 0.95) -> tuple[float, float]:
    """Interval for Δ: Student t on the paired SE, or the bootstrap percentile interval.

    The t interval uses ``estimate.dof`` degrees of freedom (normal beyond 1e7). A zero SE gives
    a zero-width interval: use :func:`paired_proportion_interval` for 0/1 scores.
    """
    if isinstance(estimate, BootstrapEstimate):
        return estimate.interval(level)
    alpha = _alpha(level)
    if math.isnan(estimate.se) or estimate.dof <= 0:
        return math.nan, math.nan
    half = student_t_quantile(1.0 - alpha / 2.0, estimate.dof) * estimate.se
    return estimate.delta - half, estimate.delta + half


def mean_pvalue(estimate: PairedEstimate | BootstrapEstimate) -> float:
    """Two-sided p-value of Δ = 0: paired t test, or the bootstrap tail proportion."""
    if isinstance(estimate, BootstrapEstimate):
        return estimate.pvalue()
    if math.isnan(estimate.se) or estimate.dof <= 0:
        return math.nan
    if estimate.se == 0:
        return 1.0 if estimate.delta == 0 else 0.0
    return float(min(1.0, 2.0 * student_t_sf(abs(estimate.delta) / estimate.se, estimate.dof)))


def delta_interval(base: Any, variant: Any, level: float = 0.95) -> tuple[float, float]:
    """Interval for Δ of a per-document mean, Tango's for 0/1 scores and paired t otherwise."""
    if is_binary(base) and is_binary(variant):
        return paired_proportion_interval(base, variant, level)
    return mean_interval(paired_mean(base, variant), level)


def delta_pvalue(base: Any, variant: Any) -> float:
    """p-value of Δ = 0 of a per-document mean, Tango's for 0/1 scores and paired t otherwise."""
    if is_binary(base) and is_binary(variant):
        return tango_pvalue(*discordant_counts(base, variant))
    return mean_pvalue(paired_mean(base, variant))
