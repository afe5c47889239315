"""Paired bootstrap of Δ for metrics whose aggregate is not a mean.

Perplexities, bits per byte, f1 and Matthews' correlation are not averages of per-document
scores, so their Δ gets no closed-form SE. Each bootstrap iteration resamples documents with
replacement and applies the SAME indices to both models, so the documents' shared difficulty
cancels as in the paired SE (Efron & Tibshirani 1993, *An Introduction to the Bootstrap*).
The generic :func:`paired_bootstrap` runs any aggregation; :func:`paired_bootstrap_ratio`
(ratio-of-sums metrics) and :func:`paired_bootstrap_confusion` (f1, mcc) are vectorized and
draw exactly the same resamples for the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np

from .distributions import _alpha

# Bootstrap index blocks hold at most this many indices (16 MiB of int64), whatever iters is.
_CHUNK_ELEMENTS = 1 << 21


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


def _index_blocks(n: int, iters: int, seed: int | None) -> Iterator[np.ndarray]:
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


def _block_draws(n: int, iters: int, seed: int | None,
                 resampled_delta: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Δ* of every iteration, computed a block of index rows at a time by ``resampled_delta``."""
    draws = np.empty(iters, dtype=np.float64)
    i = 0
    for block in _index_blocks(n, iters, seed):
        k = block.shape[0]
        draws[i:i + k] = resampled_delta(block)
        i += k
    return draws


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
            pick_b, pick_v = _resample(base_items, variant_items, idx)
            draws[i] = float(aggregate(pick_v)) - float(aggregate(pick_b))
            i += 1
    return _bootstrap_result(delta, draws, n)


def _resample(base_items: Sequence[Any], variant_items: Sequence[Any], idx: np.ndarray) -> tuple[list, list]:
    """Both models' items at the same resampled indices (one index: ``itemgetter`` returns no tuple)."""
    if idx.size == 1:
        return [base_items[0]], [variant_items[0]]
    get = itemgetter(*idx.tolist())
    return list(get(base_items)), list(get(variant_items))


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

    def resampled_delta(block: np.ndarray) -> np.ndarray:
        s_bn, s_bd, s_vn, s_vd = (a[block].sum(axis=1) for a in arrays)
        return np.asarray(f(s_vn / s_vd), dtype=np.float64) - np.asarray(f(s_bn / s_bd), dtype=np.float64)

    return _bootstrap_result(delta, _block_draws(n, iters, seed, resampled_delta), n)


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


def _confusion_counts(pairs: np.ndarray) -> list[np.ndarray]:
    """Per-document 0/1 indicators of true positive, false positive, false negative, true negative."""
    gold, pred = pairs[:, 0], pairs[:, 1]
    return [gold * pred, (1 - gold) * pred, gold * (1 - pred), (1 - gold) * (1 - pred)]


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
    base_counts, var_counts = _confusion_counts(b), _confusion_counts(v)
    delta = float(function(*(np.array([c.sum()]) for c in var_counts))[0]
                  - function(*(np.array([c.sum()]) for c in base_counts))[0])

    def resampled_delta(block: np.ndarray) -> np.ndarray:
        return (function(*(c[block].sum(axis=1) for c in var_counts))
                - function(*(c[block].sum(axis=1) for c in base_counts)))

    return _bootstrap_result(delta, _block_draws(b.shape[0], iters, seed, resampled_delta), b.shape[0])
