"""From stored variant scores to the tidy table: Δ vs the baseline, its noise, retention, and
whether a removed layer is dead weight."""

from __future__ import annotations

import math

import pandas as pd

from .perplexity import PPL_TASK
from .scoring import main_metric
from .store import VariantResult, variant_name


def retention(value: float, base: float, higher_is_better: bool) -> float:
    """Percent of the baseline kept; for lower-is-better metrics (perplexity) base/value."""
    if higher_is_better:
        return 100.0 * value / base if base else math.nan
    return 100.0 * base / value if value else math.nan


def _effect(layer: int | None, dead: bool | None, better: bool, no_noise: bool) -> str | None:
    """none (dead weight); helps / hurts beyond 2 stderr; better / worse when no stderr exists."""
    if layer is None:
        return None
    if dead:
        return "none"
    if no_noise:
        return "better" if better else "worse"
    return "helps" if better else "hurts"


def prune_frame(results: dict[int | None, VariantResult], *, tolerance: float = 0.01,
                angular: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (variant, task, metric) with baseline, Δ, its noise, retention and dead mark.

    A removed layer is *dead weight* on a metric when |Δ| ≤ max(tolerance, 2 × delta_stderr).
    ``delta_stderr`` is the stderr lm-eval reports for the variant's metric; for the built-in
    perplexity it is the paired stderr of the difference over the same windows. A metric
    without any stderr (lm-eval's perplexities) uses the tolerance alone.
    """
    if None not in results:
        raise ValueError("the baseline (nothing removed) has not been scored")
    baseline = results[None]
    base = {(r.task, r.metric): r for r in baseline.rows}
    angle = {} if angular is None else dict(zip(angular["layer"], angular["angular_distance"], strict=True))
    records = []
    for layer in [None, *sorted(k for k in results if k is not None)]:
        variant = results[layer]
        paired = (variant.ppl.paired_delta_stderr(baseline.ppl)
                  if layer is not None and variant.ppl is not None and baseline.ppl is not None else {})
        for row in variant.rows:
            ref = base.get((row.task, row.metric))
            if ref is None:
                continue
            delta = row.value - ref.value
            delta_se = paired.get(row.metric, row.stderr) if row.task == PPL_TASK else row.stderr
            if layer is None:
                delta_se = math.nan
            noise = 0.0 if math.isnan(delta_se) else 2.0 * delta_se
            dead = None if layer is None else bool(abs(delta) <= max(tolerance, noise))
            better = delta > 0 if row.higher_is_better else delta < 0
            records.append({
                "variant": variant_name(layer), "removed_layer": layer, "task": row.task, "metric": row.metric,
                "value": row.value, "stderr": row.stderr, "baseline": ref.value, "baseline_stderr": ref.stderr,
                "delta": delta, "delta_stderr": delta_se,
                "retention": retention(row.value, ref.value, row.higher_is_better),
                "dead": dead, "effect": _effect(layer, dead, better, math.isnan(delta_se)),
                "higher_is_better": row.higher_is_better, "group": row.group, "samples": row.samples,
                "angular_distance": angle.get(layer, math.nan) if layer is not None else math.nan,
            })
    frame = pd.DataFrame.from_records(records)
    frame["removed_layer"] = frame["removed_layer"].astype("Int64")
    frame["dead"] = frame["dead"].astype("boolean")
    return frame


def headline_metrics(frame: pd.DataFrame, tasks: list[str]) -> list[tuple[str, str]]:
    """(task, main metric) for each requested task (and the built-in perplexity), in order."""
    out = []
    for task in tasks:
        metrics = frame.loc[frame["task"] == task, "metric"].unique().tolist()
        if metrics:
            out.append((task, main_metric(metrics)))
    return out


def dead_layers(frame: pd.DataFrame, task: str, metric: str) -> list[int]:
    sel = frame[(frame["task"] == task) & (frame["metric"] == metric) & frame["removed_layer"].notna()]
    return [int(x) for x in sel.loc[sel["dead"].fillna(False).astype(bool), "removed_layer"]]


def rule_text(tolerance: float) -> str:
    """The dead-weight rule in words, printed under the table and kept in meta.json."""
    return (f"dead weight: |Δ| ≤ max({tolerance:g}, 2 × stderr), stderr as lm-eval reports it "
            "(built-in ppl: paired stderr of Δ; none for lm-eval perplexities)")
