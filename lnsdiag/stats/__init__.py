"""Paired statistics for "variant minus baseline" on the same documents.

Every layer-removal variant is scored on exactly the documents the full model was scored on,
so the honest noise of a difference is the *paired* noise: the spread of the per-document
differences, not the two models' stderrs combined as if independent. This package turns
aligned per-document scores into a difference Δ = variant − baseline, its standard error,
confidence intervals, a p-value, and a verdict (dead / hurts / helps / inconclusive).

Pure functions on numpy arrays and the standard library only (no scipy, torch, pandas), so it
can be tested and reused anywhere. One concept per module, each importing only those above it:

* :mod:`.distributions` — Student t (tail, quantile) and the normal, without scipy;
* :mod:`.pairs` — aligned per-document scores, and whether they are 0/1;
* :mod:`.means` — :class:`PairedEstimate`: Δ of a mean with its paired SE, lm-eval groups;
* :mod:`.bootstrap` — :class:`BootstrapEstimate`: paired bootstraps for non-mean aggregates;
* :mod:`.proportions` — 0/1 scores: Tango's score interval and test, exact McNemar;
* :mod:`.intervals` — the interval and p-value of Δ, whichever estimate it came from;
* :mod:`.decisions` — the verdict rule (TOST, then significance) and Holm's adjustment;
* :mod:`.planning` — documents needed when the answer is inconclusive;
* :mod:`.blocks` — the unit of a per-token metric on one text (windows, or blocks of ≥ 64
  tokens on a short text: batch means) and the stderr of a ratio of sums over units.

Which tool fits which metric:

* mean-type metrics (acc, exact_match, any per-document score averaged): :func:`paired_mean`,
  then :func:`mean_interval` / :func:`mean_pvalue` (Student t on the paired SE);
* 0/1 metrics (acc, exact_match): prefer :func:`paired_proportion_interval` /
  :func:`tango_pvalue` (Tango's score interval), which stays honest with few documents and does
  not collapse to a point when no answer changed; :func:`delta_interval` picks it automatically;
* lm-eval groups (MMLU): :func:`pooled_group`;
* metrics whose aggregate is not a mean (perplexities, bits per byte, f1, mcc):
  :func:`paired_bootstrap`, or the fast :func:`paired_bootstrap_ratio` for ratio-of-sums metrics
  and :func:`paired_bootstrap_confusion` for f1 and mcc;
* deciding: :func:`verdict` (TOST equivalence at α = 0.05 via the 90% interval, then the 95%
  interval for hurts/helps), :func:`holm` across the layers of one metric, and
  :func:`documents_needed` / :func:`documents_needed_binary` when the answer is inconclusive.

Each module's docstring cites its references: Tango (1998) and Newcombe (1998) for paired
proportions, Schuirmann (1987) for TOST, Holm (1979), Efron & Tibshirani (1993) for the paired
bootstrap, DLMF §8.17 for the incomplete beta behind Student's t.
"""

from __future__ import annotations

from .blocks import BLOCK_TOKENS, MIN_WINDOWS, ratio_stderr, token_blocks
from .bootstrap import (
    CONFUSION_SCORES,
    BootstrapEstimate,
    binary_pairs,
    paired_bootstrap,
    paired_bootstrap_confusion,
    paired_bootstrap_ratio,
)
from .decisions import VERDICTS, holm, relative_to_absolute, verdict
from .distributions import student_t_quantile, student_t_sf
from .intervals import delta_interval, delta_pvalue, mean_interval, mean_pvalue
from .means import PairedEstimate, paired_mean, pooled_group
from .pairs import is_binary
from .planning import documents_needed, documents_needed_binary
from .proportions import (
    EXACT_BELOW,
    discordant_counts,
    mcnemar_exact_pvalue,
    no_change_halfwidth,
    paired_proportion_interval,
    paired_proportion_pvalue,
    tango_interval,
    tango_pvalue,
    tango_statistic,
)

__all__ = [
    "BLOCK_TOKENS",
    "CONFUSION_SCORES",
    "EXACT_BELOW",
    "MIN_WINDOWS",
    "VERDICTS",
    "BootstrapEstimate",
    "PairedEstimate",
    "binary_pairs",
    "delta_interval",
    "delta_pvalue",
    "discordant_counts",
    "documents_needed",
    "documents_needed_binary",
    "holm",
    "is_binary",
    "mcnemar_exact_pvalue",
    "mean_interval",
    "mean_pvalue",
    "no_change_halfwidth",
    "paired_bootstrap",
    "paired_bootstrap_confusion",
    "paired_bootstrap_ratio",
    "paired_mean",
    "paired_proportion_interval",
    "paired_proportion_pvalue",
    "pooled_group",
    "ratio_stderr",
    "relative_to_absolute",
    "student_t_quantile",
    "student_t_sf",
    "tango_interval",
    "tango_pvalue",
    "tango_statistic",
    "token_blocks",
    "verdict",
]
