"""From stored variant scores to the tidy table: Δ vs the baseline with its *paired* noise, its
intervals, and a verdict per (removed layer, task, metric) — dead, hurts, helps or inconclusive.

The baseline and every variant answered the same documents, so the noise of a difference is
the spread of per-document differences (:mod:`lnsdiag.stats`), never the two models' own
stderrs. A layer is called dead only when equivalence is *shown*: the 90% interval of Δ lies
inside ±margin (two one-sided tests at α = 0.05). "Not significantly different" is
``inconclusive``, with the documents a decision would need.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from .. import stats
from ..interventions.units import Removal
from ..scoring.base import MetricRow, PairedUnits, main_metric
from ..scoring.lmeval.aggregate import aggregation_function
from .margins import ALPHA, LOG_LIKELIHOOD, PERPLEXITY_LIKE, Margins, base_metric, margin_kind
from .store import VariantResult

#: Resamples of the paired bootstrap: ``--bootstrap-iters`` within these bounds (per layer and metric);
#: lm-eval's aggregations written in Python at most ``PYTHON_CAP`` (each costs ms; binary f1 and mcc
#: are computed from confusion counts instead, at full count).
BOOTSTRAP_FLOOR, BOOTSTRAP_CAP, PYTHON_CAP = 1_000, 10_000, 2_000
#: lm-eval aggregations that are a ratio of sums over documents: transform(Σ −loglikelihood / Σ weight).
_RATIO_AGGREGATIONS = {"weighted_perplexity": np.exp, "bits_per_byte": lambda x: x / np.log(2)}
#: The log of the same metrics, for their ratio variant/baseline (log of exp(x) is x).
_LOG_RATIO_AGGREGATIONS = {"weighted_perplexity": lambda x: x, "bits_per_byte": np.log}



@dataclass
class Comparison:
    """Δ = variant − baseline on the same documents: its paired stderr, intervals and p-value."""

    se: float = math.nan
    lo90: float = math.nan
    hi90: float = math.nan
    lo95: float = math.nan
    hi95: float = math.nan
    p: float = math.nan
    paired: bool = False
    n: int = 0
    sd: float = math.nan  # spread of per-document differences (for the documents a decision needs)
    counts: tuple[int, int, int] | None = None  # (lost, gained, n) of 0/1 scores


def _aligned(base: dict[Any, Any], variant: dict[Any, Any]) -> tuple[list[Any], list[Any]] | None:
    if not base or base.keys() != variant.keys():
        return None
    ids = sorted(base, key=str)
    return [base[i] for i in ids], [variant[i] for i in ids]


def _leaf_parts(result: VariantResult, row: MetricRow) -> list[dict[Any, Any]] | None:
    """A group's per-leaf document items for ``row.metric``, when every leaf's aggregation is a mean."""
    parts = []
    for leaf in result.groups.get(row.task) or []:
        items = result.documents.get((leaf, row.metric))
        if items is None or result.aggregations.get((leaf, row.metric)) != "mean":
            return None
        parts.append(items)
    return parts or None


def _group_weighting(parts: list[dict[Any, Any]], value: float) -> str | None:
    """Which of lm-eval's group aggregations produced ``value`` from the leaves: ``pooled``
    (size-weighted: the mean over all documents) or ``means`` (the mean of the leaf means)."""
    items = [np.asarray(list(p.values()), dtype=float) for p in parts]
    pooled = float(np.concatenate(items).mean())
    means = float(np.mean([x.mean() for x in items]))
    tolerance = 1e-9 * max(1.0, abs(value))
    if abs(pooled - value) <= tolerance:
        return "pooled"
    return "means" if abs(means - value) <= tolerance else None


def compare(baseline: VariantResult, variant: VariantResult, row: MetricRow, ref: MetricRow, *,
            bootstrap_iters: int = BOOTSTRAP_CAP, seed: int = 1234) -> Comparison:
    """The paired comparison of one metric; unpaired (both stderrs) only when no per-document
    data exists (results stored before it was kept, a task's own aggregation function).

    Perplexity-like metrics are compared on the log of the ratio variant/baseline — their margin
    is relative — and the interval is mapped back to Δ at the baseline's level.
    """
    iters = min(max(bootstrap_iters, BOOTSTRAP_FLOOR), BOOTSTRAP_CAP)
    on_ratio = base_metric(row.metric) in PERPLEXITY_LIKE and ref.value > 0 and row.value > 0
    log_ratio = math.log(row.value / ref.value) if on_ratio else math.nan
    units, base_units = variant.units.get(row.task), baseline.units.get(row.task)
    if units is not None and base_units is not None:
        return _from_units(units, base_units, row, ref, on_ratio, log_ratio)
    key = (row.task, row.metric)
    if key not in variant.documents and row.group:
        return _group(baseline, variant, row, ref) or _unpaired(row, ref)
    pair = _aligned(baseline.documents.get(key, {}), variant.documents.get(key, {}))
    if pair is None:
        return _unpaired(row, ref)
    base_items, var_items = pair
    aggregation = variant.aggregations.get(key)
    if aggregation == "mean" and not on_ratio:
        return _means(np.asarray(base_items, dtype=float), np.asarray(var_items, dtype=float))
    if aggregation in _RATIO_AGGREGATIONS:  # transform(Σ −ll / Σ weight): on the ratio, its log
        b_num = -np.asarray([item[0] for item in base_items], dtype=float)
        v_num = -np.asarray([item[0] for item in var_items], dtype=float)
        b_den = np.asarray([item[1] for item in base_items], dtype=float)
        v_den = np.asarray([item[1] for item in var_items], dtype=float)
        transform = _LOG_RATIO_AGGREGATIONS[aggregation] if on_ratio else _RATIO_AGGREGATIONS[aggregation]
        estimate = stats.paired_bootstrap_ratio(b_num, b_den, v_num, v_den, transform, iters, seed)
        c = _from_bootstrap(estimate, floor_scale=1.0 / LOG_LIKELIHOOD.get(base_metric(row.metric), 1.0))
        return _to_delta(c, ref.value, row.value) if on_ratio else c
    if aggregation in stats.CONFUSION_SCORES and not on_ratio:
        b_pairs, v_pairs = stats.binary_pairs(base_items), stats.binary_pairs(var_items)
        if b_pairs is not None and v_pairs is not None:
            return _from_bootstrap(stats.paired_bootstrap_confusion(b_pairs, v_pairs, aggregation, iters, seed))
    function = aggregation_function(aggregation) if aggregation else None
    if function is None:
        return _unpaired(row, ref)
    target = (lambda items: math.log(function(items))) if on_ratio else function
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on resamples with a missing class
        estimate = stats.paired_bootstrap(base_items, var_items, target, min(iters, PYTHON_CAP), seed)
    c = _from_bootstrap(estimate)
    return _to_delta(c, ref.value, row.value) if on_ratio else c


def _from_units(units: PairedUnits, base: PairedUnits, row: MetricRow, ref: MetricRow, on_ratio: bool,
                log_ratio: float) -> Comparison:
    """A task paired unit by unit (the built-in perplexity's windows), on the log ratio if ``on_ratio``."""
    se = units.delta_stderr(base, row.metric, on_ratio)
    n = units.no_change_count(row.metric) if se == 0 else units.units()
    if on_ratio:
        c = _from_estimate(stats.PairedEstimate(log_ratio, se, n, se * math.sqrt(n)))
        return _to_delta(c, ref.value, row.value)
    return _from_estimate(stats.PairedEstimate(row.value - ref.value, se, n, se * math.sqrt(n)),
                          floor_scale=1.0 / LOG_LIKELIHOOD.get(base_metric(row.metric), 1.0))


def _means(b: np.ndarray, v: np.ndarray) -> Comparison:
    """A per-document mean: Tango's interval and McNemar's test for 0/1 scores, else paired t."""
    if stats.is_binary(b) and stats.is_binary(v):
        lost, gained, n = stats.discordant_counts(b, v)
        lo90, hi90 = stats.tango_interval(lost, gained, n, 0.90)
        lo95, hi95 = stats.tango_interval(lost, gained, n, 0.95)
        estimate = stats.paired_mean(b, v)
        return Comparison(estimate.se, lo90, hi90, lo95, hi95, stats.paired_proportion_pvalue(lost, gained, n), True,
                          n, estimate.sd, (lost, gained, n))
    return _from_estimate(stats.paired_mean(b, v))


def _weighting_of(result: VariantResult, row: MetricRow) -> str:
    """How lm-eval aggregated a group's metric (``pooled`` when unknown or not a group)."""
    if row.task not in result.groups:
        return "pooled"
    parts = _leaf_parts(result, row)
    return (_group_weighting(parts, row.value) if parts else None) or "pooled"


def _group(baseline: VariantResult, variant: VariantResult, row: MetricRow, ref: MetricRow) -> Comparison | None:
    """An lm-eval group on its leaves' documents, aggregated as lm-eval aggregated it: pooled
    (size-weighted, MMLU) or as the mean of the leaf means; None if neither reproduces its value."""
    base_parts, var_parts = _leaf_parts(baseline, ref), _leaf_parts(variant, row)
    if not base_parts or not var_parts or len(base_parts) != len(var_parts):
        return None
    pairs = [_aligned(b, v) for b, v in zip(base_parts, var_parts, strict=True)]
    if any(p is None for p in pairs):
        return None
    weighting = _group_weighting(base_parts, ref.value)
    if weighting is None or _group_weighting(var_parts, row.value) != weighting:
        return None
    arrays = [(np.asarray(b, dtype=float), np.asarray(v, dtype=float)) for b, v in pairs]
    if weighting == "pooled":
        return _means(np.concatenate([b for b, _ in arrays]), np.concatenate([v for _, v in arrays]))
    return _from_estimate(stats.pooled_group(arrays, weight_by_size=False))


def _unpaired(row: MetricRow, ref: MetricRow) -> Comparison:
    """No per-document data: both stderrs as if independent (NaN, and so no verdict, when unknown)."""
    se = math.sqrt(row.stderr ** 2 + ref.stderr ** 2)
    return _from_estimate(stats.PairedEstimate(row.value - ref.value, se, 0, math.nan), paired=False)


def _to_delta(c: Comparison, baseline: float, value: float) -> Comparison:
    """A comparison made on log(variant/baseline), in Δ = variant − baseline units: bounds map
    exactly (b·(e^x − 1)); the stderr by the delta method at the estimate (variant·se); the
    per-document spread at the baseline's level, where the margin is."""
    def mapped(x: float) -> float:
        return baseline * math.expm1(x) if math.isfinite(x) else math.nan

    return Comparison(value * c.se, mapped(c.lo90), mapped(c.hi90), mapped(c.lo95), mapped(c.hi95), c.p, c.paired,
                      c.n, baseline * c.sd)


def _from_bootstrap(estimate: stats.BootstrapEstimate, floor_scale: float = 1.0) -> Comparison:
    """A paired bootstrap read as a stderr with Student t on n − 1 degrees of freedom (the SE
    scaled by √(n/(n−1))), not as percentiles: percentile intervals are too narrow with few
    documents, and the verdict must stay honest there."""
    n = estimate.n
    if n < 2:
        return Comparison(paired=True, n=n)
    se = estimate.se * math.sqrt(n / (n - 1))
    return _from_estimate(stats.PairedEstimate(estimate.delta, se, n, se * math.sqrt(n)), floor_scale=floor_scale)


def _from_estimate(estimate: Any, paired: bool = True, floor_scale: float = 1.0) -> Comparison:
    """Intervals and p-value of a paired estimate (Student t), or of two independent stderrs.

    Per-document differences that are all zero give no spread to learn from: the interval is
    then Tango's for "nothing changed" (±z²/(n + z²), times ``floor_scale``, the metric's unit
    range), so a few identical documents never prove equivalence, while many can.
    """
    if not math.isfinite(estimate.se):
        return Comparison(paired=paired, n=estimate.n)
    if paired and estimate.se == 0 and estimate.n > 0:
        h90 = floor_scale * stats.no_change_halfwidth(estimate.n, 0.90)
        h95 = floor_scale * stats.no_change_halfwidth(estimate.n, 0.95)
        d = estimate.delta
        p = 1.0 if d == 0 else 2 * (1 - NormalDist().cdf(abs(d) / (h95 / NormalDist().inv_cdf(0.975))))
        return Comparison(0.0, d - h90, d + h90, d - h95, d + h95, p, True, estimate.n, 0.0)
    if paired:
        lo90, hi90 = stats.mean_interval(estimate, 0.90)
        lo95, hi95 = stats.mean_interval(estimate, 0.95)
        p = stats.mean_pvalue(estimate)
    else:  # two independent stderrs: a normal interval
        z90, z95 = NormalDist().inv_cdf(0.95), NormalDist().inv_cdf(0.975)
        lo90, hi90 = estimate.delta - z90 * estimate.se, estimate.delta + z90 * estimate.se
        lo95, hi95 = estimate.delta - z95 * estimate.se, estimate.delta + z95 * estimate.se
        p = 2 * (1 - NormalDist().cdf(abs(estimate.delta) / estimate.se)) if estimate.se > 0 else math.nan
    sd = getattr(estimate, "sd", math.nan)
    if not math.isfinite(sd) and estimate.n:
        sd = estimate.se * math.sqrt(estimate.n)
    return Comparison(estimate.se, lo90, hi90, lo95, hi95, p, paired, estimate.n, sd)




def _above_margin(c: Comparison, delta: float, margin: float) -> Comparison:
    """A divergence from the full model (KL ≥ 0): its intervals cut at 0, and its p-value the one-sided
    test of "more than the margin" (a minimum-effect test: every change moves KL above 0, so
    "hurts" must mean above the margin, shown)."""
    if not math.isfinite(c.se):
        return c
    shown = c.se > 0 and c.n > 1
    p = stats.student_t_sf((delta - margin) / c.se, c.n - 1) if shown else float(delta <= margin)
    return Comparison(c.se, max(c.lo90, 0.0), c.hi90, max(c.lo95, 0.0), c.hi95, p, c.paired, c.n, c.sd, c.counts)


def _documents_needed(c: Comparison, delta: float, margin: float) -> int | None:
    if not math.isfinite(margin) or margin <= 0:
        return None
    if c.counts is not None:
        return stats.documents_needed_binary(*c.counts, margin)
    if c.paired and math.isfinite(c.sd) and c.sd > 0:
        return stats.documents_needed(c.sd, delta, margin)
    return None


def chance_level(result: VariantResult, task: str, metric: str, weighting: str = "pooled") -> float | None:
    """Accuracy by guessing: the mean of 1/choices over a multiple-choice task's documents; for a
    group aggregated as the mean of its leaves' means (``weighting="means"``), the mean of the
    leaves' chance levels."""
    if base_metric(metric) not in ("acc", "acc_norm"):
        return None
    leaves = result.groups.get(task) or [task]
    inverse = [[1.0 / n for n in result.choices.get(leaf, {}).values() if n] for leaf in leaves]
    if weighting == "means":
        per_leaf = [float(np.mean(x)) for x in inverse if x]
        return float(np.mean(per_leaf)) if per_leaf and len(per_leaf) == len(leaves) else None
    pooled = [x for leaf in inverse for x in leaf]
    return float(np.mean(pooled)) if pooled else None


def retention(value: float, base: float, higher_is_better: bool, chance: float | None = None) -> float:
    """Percent of the baseline kept: above chance for multiple-choice accuracy ((v − c)/(b − c);
    undefined for a baseline within a point of chance), v/b for other higher-is-better metrics,
    b/v for perplexity-like ones."""
    if higher_is_better:
        floor = chance or 0.0
        return 100.0 * (value - floor) / (base - floor) if base - floor > (0.01 if chance else 0) else math.nan
    return 100.0 * base / value if value else math.nan


def prune_frame(results: Mapping[Removal, VariantResult], *, margins: Margins | None = None,
                angular: pd.DataFrame | None = None, bootstrap_iters: int = BOOTSTRAP_CAP,
                seed: int = 1234, cache: dict[tuple, Comparison] | None = None) -> pd.DataFrame:
    """One row per (variant, task, metric): value, baseline, Δ with paired stderr and intervals,
    the verdict (``dead`` = verdict is dead, kept as a boolean), retention, angular distance.

    ``results`` maps what each variant removes to its scores, the full model (``Removal()``)
    included. ``cache`` keeps comparisons between calls on a growing set of results (a sweep
    rebuilds its table after every variant; a bootstrap need not be redone for the variants
    already in it)."""
    if Removal() not in results:
        raise ValueError("the baseline (nothing removed) has not been scored")
    margins = margins or Margins()
    baseline = results[Removal()]
    base = {(r.task, r.metric): r for r in baseline.rows}
    angle = {} if angular is None else _angles(angular)
    records, removals = [], []
    for removal in sorted(results):  # the full model first
        variant = results[removal]
        for row in variant.rows:
            ref = base.get((row.task, row.metric))
            if ref is None:
                continue
            c = Comparison()
            if removal:
                key = (removal, variant.finished, baseline.finished, row.task, row.metric, bootstrap_iters, seed)
                c = cache.get(key) if cache is not None else None
                if c is None:
                    c = compare(baseline, variant, row, ref, bootstrap_iters=bootstrap_iters, seed=seed)
                    if cache is not None:
                        cache[key] = c
            kind = margin_kind(row.metric)
            margin = margins.of(row.metric, ref.value)
            if removal and kind == "divergence":
                c = _above_margin(c, row.value - ref.value, margin)
            chance = chance_level(baseline, row.task, row.metric, _weighting_of(baseline, ref))
            removals.append(removal)
            records.append({
                "variant": removal.name, "task": row.task, "metric": row.metric,
                "value": row.value, "stderr": row.stderr, "baseline": ref.value, "baseline_stderr": ref.stderr,
                "delta": row.value - ref.value, "delta_stderr": c.se, "paired": c.paired if removal else None,
                "ci90_low": c.lo90, "ci90_high": c.hi90, "ci95_low": c.lo95, "ci95_high": c.hi95,
                "margin": margin, "p_value": c.p, "_comparison": c, "_descriptive": kind == "descriptive",
                "retention": retention(row.value, ref.value, row.higher_is_better, chance), "chance": chance,
                "higher_is_better": row.higher_is_better, "group": row.group, "samples": row.samples,
                "angular_distance": _angle_of(angle, removal),
            })
    frame = pd.DataFrame.from_records(records)
    frame["removed_layer"] = _removed_column(removals)
    frame["unit"] = pd.array([r.kind or None for r in removals], dtype=object)
    frame["p_holm"] = math.nan
    removed = pd.Series([bool(r) for r in removals], index=frame.index, dtype=bool)
    for _, part in frame[removed].groupby(["task", "metric"], sort=False):
        frame.loc[part.index, "p_holm"] = stats.holm(part["p_value"].to_numpy())
    verdicts, needed = [], []
    for (_, r), removal in zip(frame.iterrows(), removals, strict=True):
        if not removal or r["_descriptive"]:
            verdicts.append(None)
            needed.append(None)
            continue
        c = r["_comparison"]
        v = stats.verdict(c.lo90, c.hi90, c.lo95, c.hi95, r["margin"], r["higher_is_better"], p_adjusted=r["p_holm"],
                          delta=r["delta"], alpha=ALPHA)
        verdicts.append(v)
        needed.append(_documents_needed(r["_comparison"], r["delta"], r["margin"]) if v == "inconclusive" else None)
    frame["verdict"] = verdicts
    frame["dead"] = pd.array([None if v is None else v == "dead" for v in verdicts], dtype="boolean")
    frame["documents_needed"] = pd.array(needed, dtype="Int64")
    columns = ["variant", "removed_layer", "unit", "task", "metric", "value", "stderr", "baseline", "baseline_stderr",
               "delta", "delta_stderr", "paired", "ci90_low", "ci90_high", "ci95_low", "ci95_high", "margin",
               "p_value", "p_holm", "verdict", "dead", "documents_needed", "retention", "chance", "higher_is_better",
               "group", "samples", "angular_distance"]
    return frame[columns]


def _removed_column(removals: Sequence[Removal]) -> pd.api.extensions.ExtensionArray:
    """prune.csv's ``removed_layer``: while every variant removes at most one unit (a one-at-a-time
    sweep), the unit's block as a nullable int (empty for the full model; which part of it, the
    ``unit`` column says); else each removal's CSV cell
    (:attr:`~lnsdiag.interventions.units.Removal.cell`)."""
    if all(r.single is not None for r in removals if r):
        return pd.array([r.single.block if r else None for r in removals], dtype="Int64")
    return pd.array([r.cell or None for r in removals], dtype=object)


def _angles(angular: pd.DataFrame) -> dict[tuple[int, str], float]:
    """Angular distances by (layer, unit kind): a frame without a ``unit`` column holds blocks."""
    units = angular["unit"] if "unit" in angular else ["block"] * len(angular)
    return {(int(layer), str(unit)): float(d)
            for layer, unit, d in zip(angular["layer"], units, angular["angular_distance"], strict=True)}


def _angle_of(angle: dict[tuple[int, str], float], removal: Removal) -> float:
    """The angular distance of a one-unit removal's unit (NaN for anything else)."""
    unit = removal.single
    return math.nan if unit is None else angle.get((unit.block, unit.kind), math.nan)


def headline_metrics(frame: pd.DataFrame, tasks: list[str]) -> list[tuple[str, str]]:
    """(task, main metric) for each requested task (and the built-in perplexity), in order."""
    out = []
    for task in tasks:
        metrics = frame.loc[frame["task"] == task, "metric"].unique().tolist()
        if metrics:
            out.append((task, main_metric(metrics)))
    return out


def layers_with(frame: pd.DataFrame, task: str, metric: str, verdict: str, unit: str = "block") -> list[int]:
    """The removed layers whose ``unit`` (``block``, ``attn``, ``mlp``) has verdict ``verdict`` on (task, metric)."""
    sel = of_unit(frame[(frame["task"] == task) & (frame["metric"] == metric)], unit)
    return [int(x) for x in sel.loc[sel["verdict"] == verdict, "removed_layer"]]


def of_unit(frame: pd.DataFrame, unit: str = "block") -> pd.DataFrame:
    """The rows of a prune table that remove one unit of kind ``unit``; a table without a ``unit`` column
    (written before sub-layers) removes whole blocks."""
    removed = frame[frame["removed_layer"].notna()]
    if "unit" not in removed:
        return removed if unit == "block" else removed.iloc[:0]
    return removed[removed["unit"] == unit]


def unit_kinds(frame: pd.DataFrame) -> list[str]:
    """The unit kinds a prune table removes, in block, attn, mlp order (``block`` for an older table)."""
    if "unit" not in frame:
        return ["block"]
    present = set(frame["unit"].dropna())
    return [k for k in ("block", "attn", "mlp") if k in present]
