"""Paired statistics for "variant minus baseline" on the same documents.

Every layer-removal variant is scored on exactly the documents the full model was scored on,
so the honest noise of a difference is the *paired* noise: the spread of the per-document
differences, not the two models' stderrs combined as if independent. This module turns
aligned per-document scores into a difference Δ = variant − baseline, its standard error,
confidence intervals, a p-value, and a verdict (dead / hurts / helps / inconclusive).

Pure functions on numpy arrays and the standard library only (no scipy, torch, pandas), so it
can be tested and reused anywhere. Which tool fits which metric:

* mean-type metrics (acc, exact_match, any per-document score averaged): :func:`paired_mean`,
  then :func:`mean_interval` / :func:`mean_pvalue` (Student t on the paired SE);
* 0/1 metrics (acc, exact_match): prefer :func:`paired_proportion_interval` /
  :func:`tango_pvalue` (Tango's score interval), which stays honest with few documents and does
  not collapse to a point when no answer changed; :func:`delta_interval` picks it automatically;
* lm-eval groups (MMLU): :func:`pooled_group`;
* metrics whose aggregate is not a mean (perplexities, bits per byte, f1, mcc):
  :func:`paired_bootstrap`, or the fast :func:`paired_bootstrap_ratio` for ratio-of-sums metrics;
* deciding: :func:`verdict` (TOST equivalence at α = 0.05 via the 90% interval, then the 95%
  interval for hurts/helps), :func:`holm` across the layers of one metric, and
  :func:`documents_needed` / :func:`documents_needed_binary` when the answer is inconclusive.

References: Tango (1998) Stat Med 17:891–908 (score interval for a paired difference);
Newcombe (1998) Stat Med 17:2635–2650 (review of paired intervals); Schuirmann (1987)
J Pharmacokinet Biopharm 15:657 (two one-sided tests); Holm (1979) Scand J Stat 6:65;
Efron & Tibshirani (1993) *An Introduction to the Bootstrap* (paired / percentile bootstrap);
DLMF §8.17 (incomplete beta continued fraction, used for the Student t distribution).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "VERDICTS",
    "BootstrapEstimate",
    "PairedEstimate",
    "delta_interval",
    "delta_pvalue",
    "discordant_counts",
    "documents_needed",
    "documents_needed_binary",
    "holm",
    "is_binary",
    "mean_interval",
    "mean_pvalue",
    "paired_bootstrap",
    "paired_bootstrap_ratio",
    "paired_mean",
    "paired_proportion_interval",
    "pooled_group",
    "relative_to_absolute",
    "student_t_quantile",
    "student_t_sf",
    "tango_interval",
    "tango_pvalue",
    "tango_statistic",
    "verdict",
]

VERDICTS = ("dead", "hurts", "helps", "inconclusive")

_NORMAL = NormalDist()
# Above this many degrees of freedom the t and normal quantiles agree to < 1e-7 relative.
_T_NORMAL_DF = 1e7
# Bootstrap index blocks hold at most this many indices (16 MiB of int64), whatever iters is.
_CHUNK_ELEMENTS = 1 << 21


# --------------------------------------------------------------------------------------------
# result types


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


@dataclass(frozen=True, eq=False)
class BootstrapEstimate:
    """Δ of an arbitrary aggregate with its paired-bootstrap distribution.

    ``delta``: the aggregate difference on the full data; ``se``: sd (ddof=1) of the bootstrap
    differences Δ*; ``n``: documents; ``draws``: the Δ* themselves, one per iteration, so that
    percentile intervals and p-values can be read off.
    """

    delta: float
    se: float
    n: int
    draws: np.ndarray

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """Percentile interval of Δ* (Efron & Tibshirani 1993, ch. 13)."""
        alpha = _alpha(level)
        lo, hi = np.quantile(self.draws, [alpha / 2.0, 1.0 - alpha / 2.0])
        return float(lo), float(hi)

    def pvalue(self) -> float:
        """Two-sided bootstrap p-value of Δ = 0: 2·min(P(Δ* ≤ 0), P(Δ* ≥ 0)), kept in [1/iters, 1]."""
        iters = self.draws.size
        if iters == 0:
            return math.nan
        below = float(np.count_nonzero(self.draws <= 0.0)) / iters
        above = float(np.count_nonzero(self.draws >= 0.0)) / iters
        return float(min(1.0, max(1.0 / iters, 2.0 * min(below, above))))


# --------------------------------------------------------------------------------------------
# small helpers


def _alpha(level: float) -> float:
    """1 − level, after checking the level is a probability strictly between 0 and 1."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie strictly between 0 and 1, got {level!r}")
    return 1.0 - level


def _z(level: float) -> float:
    """Two-sided standard normal critical value for a confidence level."""
    return _NORMAL.inv_cdf(1.0 - _alpha(level) / 2.0)


def _pair(base: Any, variant: Any) -> tuple[np.ndarray, np.ndarray]:
    """Two aligned 1-D float arrays; refuses misaligned input, the one error pairing cannot survive."""
    b = np.asarray(base, dtype=np.float64).ravel()
    v = np.asarray(variant, dtype=np.float64).ravel()
    if b.shape != v.shape:
        raise ValueError(f"base and variant must score the same documents: {b.size} vs {v.size} values")
    return b, v


def is_binary(x: Any) -> bool:
    """True when every value is 0 or 1 (such metrics get Tango's interval, not a t interval)."""
    a = np.asarray(x, dtype=np.float64)
    return bool(a.size) and bool(np.all((a == 0.0) | (a == 1.0)))


def relative_to_absolute(margin_rel: float, baseline: float) -> float:
    """An equivalence margin given as a fraction of the baseline (perplexity: 0.01 = 1%) in Δ units.

    :func:`verdict` works on Δ in the metric's own units, so a relative margin is scaled once
    here: |margin_rel × baseline|.
    """
    return abs(float(margin_rel) * float(baseline))


# --------------------------------------------------------------------------------------------
# Student t without scipy


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
    front = math.exp(log_front) / a
    tiny = 1e-300
    # modified Lentz on 1/(1 + d1/(1 + d2/(1 + ...)))
    f = tiny
    c = f
    d = 0.0
    for j in range(1, 200_000):
        if j == 1:
            num = 1.0
        else:
            k = j - 1  # index of d_k
            m = k // 2
            if k % 2 == 0:
                num = m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m))
            else:
                num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))
        d = 1.0 + num * d
        if abs(d) < tiny:
            d = tiny
        c = 1.0 + num / c
        if abs(c) < tiny:
            c = tiny
        d = 1.0 / d
        step = c * d
        f *= step
        if abs(step - 1.0) < 1e-15:
            break
    return front * f


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
    lo, hi = 0.0, max(1.0, abs(_NORMAL.inv_cdf(p)))
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
    q = 0.5 * (lo + hi)
    return q if p > 0.5 else -q


# --------------------------------------------------------------------------------------------
# 1-2. paired means and lm-eval groups


def paired_mean(base: Any, variant: Any) -> PairedEstimate:
    """Δ and paired SE of a per-document mean: SE = sd(variant − base, ddof=1)/√n.

    The document-to-document difficulty both models share cancels in the difference, which is
    why this SE is far smaller than the two unpaired stderrs combined. n < 2 gives se = nan.
    """
    b, v = _pair(base, variant)
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
        pairs = [_pair(b, v) for b, v in parts]
        return paired_mean(np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]))
    ests = [paired_mean(b, v) for b, v in parts]
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


# --------------------------------------------------------------------------------------------
# 3. paired bootstrap


def _index_blocks(n: int, iters: int, seed: int | None):
    """Bootstrap document indices, a block of rows at a time.

    Row i is row i of ``default_rng(seed).integers(0, n, size=(iters, n))``: drawing the rows in
    blocks leaves numpy's stream unchanged, so blocks only bound memory, never change results.
    """
    if n < 1:
        raise ValueError("no documents to resample")
    if iters < 2:
        raise ValueError("a bootstrap needs at least 2 iterations")
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // n)
    done = 0
    while done < iters:
        k = min(rows, iters - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def _bootstrap_result(delta: float, draws: np.ndarray, n: int) -> BootstrapEstimate:
    """Pack the draws with their sd (ddof=1) as the standard error."""
    draws.setflags(write=False)
    return BootstrapEstimate(float(delta), float(np.std(draws, ddof=1)), n, draws)


def paired_bootstrap(
    base_items: Sequence[Any],
    variant_items: Sequence[Any],
    aggregate: Callable[[list[Any]], float],
    iters: int = 10_000,
    seed: int | None = 0,
) -> BootstrapEstimate:
    """Paired bootstrap of Δ = aggregate(variant) − aggregate(base) for any aggregation.

    ``aggregate`` takes a list of per-document items as lm-eval's aggregation functions do
    ((loglikelihood, words) tuples for word perplexity, (gold, pred) pairs for f1, ...). Each
    iteration resamples documents with replacement and applies the SAME indices to both models,
    so the shared difficulty of the documents cancels, as in the paired SE. Indices follow
    ``numpy.random.default_rng(seed)``: iteration i uses row i of
    ``integers(0, n, size=(iters, n))``; they are drawn in bounded blocks.
    """
    n = len(base_items)
    if len(variant_items) != n:
        raise ValueError(f"base and variant must score the same documents: {n} vs {len(variant_items)} items")
    delta = float(aggregate(list(variant_items))) - float(aggregate(list(base_items)))
    draws = np.empty(iters, dtype=np.float64)
    i = 0
    for block in _index_blocks(n, iters, seed):
        for idx in block:
            if n == 1:
                pick_b, pick_v = [base_items[0]], [variant_items[0]]
            else:
                get = itemgetter(*idx.tolist())
                pick_b, pick_v = list(get(base_items)), list(get(variant_items))
            draws[i] = float(aggregate(pick_v)) - float(aggregate(pick_b))
            i += 1
    return _bootstrap_result(delta, draws, n)


def paired_bootstrap_ratio(
    base_num: Any,
    base_den: Any,
    var_num: Any,
    var_den: Any,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    iters: int = 10_000,
    seed: int | None = 0,
) -> BootstrapEstimate:
    """Vectorized paired bootstrap for metrics of the form transform(Σnum / Σden).

    Word perplexity: num = −loglikelihood, den = words, transform = np.exp. Bits per byte:
    num = −loglikelihood, den = bytes, transform = x / ln 2. Token perplexity: num = window NLL
    sum, den = tokens, transform = np.exp. ``transform`` must accept numpy arrays (None =
    identity). Resampling is multinomial (equivalently, indices with replacement), identical
    for both models and drawn exactly as in :func:`paired_bootstrap` for the same seed, so the
    two agree draw for draw on the same data; sums are gathered in bounded blocks.
    """
    arrays = [np.asarray(a, dtype=np.float64).ravel() for a in (base_num, base_den, var_num, var_den)]
    n = arrays[0].size
    if any(a.size != n for a in arrays):
        raise ValueError("numerators and denominators must cover the same documents")
    f = (lambda x: x) if transform is None else transform
    full = [float(a.sum()) for a in arrays]
    delta = float(f(np.float64(full[2] / full[3]))) - float(f(np.float64(full[0] / full[1])))
    draws = np.empty(iters, dtype=np.float64)
    i = 0
    for block in _index_blocks(n, iters, seed):
        s_bn, s_bd, s_vn, s_vd = (a[block].sum(axis=1) for a in arrays)
        k = block.shape[0]
        draws[i:i + k] = np.asarray(f(s_vn / s_vd), dtype=np.float64) - np.asarray(f(s_bn / s_bd), dtype=np.float64)
        i += k
    return _bootstrap_result(delta, draws, n)


#: lm-eval's confusion-matrix aggregations of binary (gold, prediction) pairs, as sklearn computes
#: them (``average="binary"``, positive class 1; 0 when the denominator is 0), on count arrays.
CONFUSION_SCORES: dict[str, Callable[..., np.ndarray]] = {
    "f1": lambda tp, fp, fn, tn: np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp),
                                           where=(2 * tp + fp + fn) > 0),
    "matthews_corrcoef": lambda tp, fp, fn, tn: np.divide(
        tp * tn - fp * fn, np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)), out=np.zeros_like(tp),
        where=((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) > 0),
}


def binary_pairs(items: Sequence[Any]) -> np.ndarray | None:
    """(gold, prediction) items as an (n, 2) 0/1 array, or None if any label is not 0 or 1."""
    try:
        pairs = np.asarray([(item[0], item[1]) for item in items], dtype=float)
    except (TypeError, ValueError, IndexError):
        return None
    if pairs.ndim != 2 or pairs.shape[1] != 2 or not np.isin(pairs, (0.0, 1.0)).all():
        return None
    return pairs


def paired_bootstrap_confusion(base_pairs: Any, variant_pairs: Any, score: str, iters: int = 10_000,
                               seed: int | None = 0) -> BootstrapEstimate:
    """Vectorized paired bootstrap of f1 or Matthews' correlation over binary (gold, prediction) pairs.

    Both are functions of the four confusion counts, so a resample only needs four sums per model;
    indices are drawn exactly as in :func:`paired_bootstrap` (same seed, same draws), which runs
    sklearn once per resample and is thousands of times slower.
    """
    function = CONFUSION_SCORES[score]
    b, v = np.asarray(base_pairs, dtype=float), np.asarray(variant_pairs, dtype=float)
    if b.shape != v.shape or b.ndim != 2 or b.shape[1] != 2:
        raise ValueError("base and variant must be (n, 2) arrays of (gold, prediction) for the same documents")

    def counts(pairs: np.ndarray) -> list[np.ndarray]:
        gold, pred = pairs[:, 0], pairs[:, 1]
        return [gold * pred, (1 - gold) * pred, gold * (1 - pred), (1 - gold) * (1 - pred)]

    base_counts, var_counts = counts(b), counts(v)
    delta = float(function(*(np.array([c.sum()]) for c in var_counts))[0]
                  - function(*(np.array([c.sum()]) for c in base_counts))[0])
    draws = np.empty(iters, dtype=np.float64)
    i = 0
    for block in _index_blocks(b.shape[0], iters, seed):
        k = block.shape[0]
        draws[i:i + k] = (function(*(c[block].sum(axis=1) for c in var_counts))
                          - function(*(c[block].sum(axis=1) for c in base_counts)))
        i += k
    return _bootstrap_result(delta, draws, b.shape[0])


# --------------------------------------------------------------------------------------------
# 4. Tango's score interval for a paired difference of proportions


def discordant_counts(base01: Any, variant01: Any) -> tuple[int, int, int]:
    """(b, c, n): documents right only for the base, right only for the variant, and all documents."""
    b, v = _pair(base01, variant01)
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

    def solve(target: float, lo: float, hi: float) -> float:
        # T(lo) - target and T(hi) - target have opposite signs; T decreasing.
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if tango_statistic(b, c, n, mid) > target:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-14:
                break
        return 0.5 * (lo + hi)

    upper = 1.0 if tango_statistic(b, c, n, 1.0) >= -z else solve(-z, est, 1.0)
    lower = -1.0 if tango_statistic(b, c, n, -1.0) <= z else solve(z, -1.0, est)
    return lower, upper


def tango_pvalue(b: int, c: int, n: int) -> float:
    """Two-sided p-value of Δ = 0 from Tango's statistic: 2(1 − Φ(|T(0)|)) (T(0) is McNemar's z)."""
    t0 = tango_statistic(b, c, n, 0.0)
    return float(min(1.0, 2.0 * (1.0 - _NORMAL.cdf(abs(t0)))))


#: Below this many changed answers the normal approximation of McNemar's test is too optimistic.
EXACT_BELOW = 25


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


# --------------------------------------------------------------------------------------------
# 5. intervals and p-values of estimates


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


# --------------------------------------------------------------------------------------------
# 6. verdicts


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
        worse_side = hi95 < 0 if higher_is_better else lo95 > 0
        better_side = lo95 > 0 if higher_is_better else hi95 < 0
    else:
        significant = math.isfinite(p_adjusted) and p_adjusted < alpha
        worse_side = significant and (delta < 0 if higher_is_better else delta > 0)
        better_side = significant and not worse_side
    if worse_side:
        return "hurts"
    if better_side:
        return "helps"
    return "inconclusive"


# --------------------------------------------------------------------------------------------
# 7. multiplicity


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


# --------------------------------------------------------------------------------------------
# 8. planning


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
    z = _NORMAL.inv_cdf(1.0 - alpha)
    d = abs(delta)
    hi = 2
    while _tost_power(hi, sd_d, d, margin, z) < power:
        hi *= 2
        if hi > 1 << 62:
            return None
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _tost_power(mid, sd_d, d, margin, z) >= power:
            hi = mid
        else:
            lo = mid
    return max(2, hi)


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
    if b + c == 0:
        delta, var = 0.0, 1.0 / n
    else:
        delta = (c - b) / n
        var = (b + c) / n - delta * delta
    need = documents_needed(math.sqrt(max(var, 0.0)), delta, margin, alpha, power)
    if need is None:
        return None
    z2 = _NORMAL.inv_cdf(1.0 - alpha) ** 2
    floor = math.floor(z2 * (1.0 - margin) / margin) + 1 if margin < 1 else 2
    return max(need, floor)
