"""Δ of a mean-type metric with its paired standard error, for one task or an lm-eval group.

Every variant is scored on the documents the full model was scored on, so the honest noise of
Δ = mean(variant) − mean(base) is the spread of the per-document differences: the difficulty
both models share cancels, and the paired SE is far smaller than the two unpaired stderrs
combined. A group (MMLU) pools its subtasks' documents, or averages their means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .pairs import paired_arrays


@dataclass(frozen=True)
class PairedEstimate:
    """Δ of a mean-type metric with its paired standard error.

    ``delta``: mean(variant) − mean(base); ``se``: standard error of Δ from the per-document
    differences; ``n``: documents; ``sd``: standard deviation (ddof=1) of the per-document
    differences (for planning, :func:`documents_needed`); ``df``: degrees of freedom for the
    t interval, ``None`` meaning n − 1 (set by :func:`pooled_group` when not size-weighted).
    """

    delta: float
    se: float
    n: int
    sd: float
    df: float | None = None

    @property
    def dof(self) -> float:
        """Degrees of freedom of the t reference distribution (n − 1 unless set)."""
        return float(self.n - 1) if self.df is None else float(self.df)


def paired_mean(base: Any, variant: Any) -> PairedEstimate:
    """Δ and paired SE of a per-document mean: SE = sd(variant − base, ddof=1)/√n.

    The document-to-document difficulty both models share cancels in the difference, which is
    why this SE is far smaller than the two unpaired stderrs combined. n < 2 gives se = nan.
    """
    b, v = paired_arrays(base, variant)
    n = int(b.size)
    if n == 0:
        raise ValueError("no documents to compare")
    d = v - b
    delta = float(v.mean() - b.mean())
    if n < 2:
        return PairedEstimate(delta, math.nan, n, math.nan)
    sd = float(d.std(ddof=1))
    return PairedEstimate(delta, sd / math.sqrt(n), n, sd)


def pooled_group(parts: Sequence[tuple[Any, Any]], weight_by_size: bool = True) -> PairedEstimate:
    """Δ and paired SE of an lm-eval group (e.g. MMLU) from its subtasks' per-document scores.

    ``weight_by_size=True`` (lm-eval's default for MMLU): the group score is the mean over all
    documents pooled, so Δ and SE are those of the pooled per-document differences.
    ``weight_by_size=False`` (mean of subtask means): Δ = mean of the subtask Δs and
    SE = sqrt(Σ se_t²)/T (subtasks are disjoint document sets, hence independent); ``df`` is
    the Welch–Satterthwaite value and ``sd`` the equivalent per-document spread se·√n.
    """
    if not parts:
        raise ValueError("a group needs at least one subtask")
    if weight_by_size:
        pairs = [paired_arrays(b, v) for b, v in parts]
        return paired_mean(np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]))
    return _mean_of_means([paired_mean(b, v) for b, v in parts])


def _mean_of_means(ests: Sequence[PairedEstimate]) -> PairedEstimate:
    """A group scored as the mean of its subtask means: independent subtasks' SEs add in quadrature."""
    t = len(ests)
    n = sum(e.n for e in ests)
    delta = float(sum(e.delta for e in ests) / t)
    var_sum = sum(e.se**2 for e in ests)
    se = math.sqrt(var_sum) / t
    if math.isnan(se):
        return PairedEstimate(delta, math.nan, n, math.nan)
    # Welch–Satterthwaite degrees of freedom of a sum of independent variance estimates.
    denom = sum(e.se**4 / (e.n - 1) for e in ests)
    df = var_sum**2 / denom if denom > 0 else float(n - t)
    return PairedEstimate(delta, se, n, se * math.sqrt(n), df)
