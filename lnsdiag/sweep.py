"""The one-layer-removal sweep: which variants, the resumable result store, the naive engine,
and the tidy table (Δ vs baseline, retention, dead weight) built from stored results.

A run's folder holds ``settings.json`` (what makes results comparable) and one JSON file per
finished variant under ``variants/``, each written atomically the moment it is done. Rerunning
the same command scores only what is missing; different settings are refused, not mixed.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import UserError
from .runs import read_json, write_json
from .scoring import PPL_TASK, MetricRow, Perplexity, Scorer, Scores, main_metric
from .surgery import LayerStack, removed_layers

#: Settings that change the numbers; a stored run is only resumed when all of them agree.
FINGERPRINT_KEYS = ("model", "revision", "dtype", "tasks", "include_path", "num_fewshot", "limit", "seed",
                    "bootstrap_iters", "ppl_text", "ppl_max_tokens", "seq_len", "layers_path", "max_length")


def variant_name(layer: int | None) -> str:
    return "baseline" if layer is None else f"layer_{layer:03d}"


@dataclass
class VariantResult:
    """The scores of the model with ``removed_layer`` removed (``None``: the full model)."""

    removed_layer: int | None
    rows: list[MetricRow]
    seconds: float
    engine: str = "naive"
    finished: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    ppl: Perplexity | None = None

    @classmethod
    def of(cls, layer: int | None, scores: Scores, seconds: float, engine: str) -> VariantResult:
        return cls(layer, scores.rows, seconds, engine, ppl=scores.ppl)

    def to_json(self) -> dict[str, Any]:
        return {"removed_layer": self.removed_layer, "seconds": round(self.seconds, 3), "engine": self.engine,
                "finished": self.finished, "metrics": [r.as_dict() for r in self.rows],
                "ppl_windows": self.ppl.as_json() if self.ppl else None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VariantResult:
        rows = [MetricRow(**{**r, "stderr": math.nan if r["stderr"] is None else r["stderr"]})
                for r in data["metrics"]]
        ppl = Perplexity(**data["ppl_windows"]) if data.get("ppl_windows") else None
        return cls(data["removed_layer"], rows, data["seconds"], data.get("engine", "naive"), data["finished"], ppl)


class ResultStore:
    """A run folder: ``settings.json`` plus ``variants/<name>.json`` per finished variant."""

    def __init__(self, folder: Path, settings: dict[str, Any], *, fresh: bool = False) -> None:
        self.folder = Path(folder)
        self.variants = self.folder / "variants"
        self.settings = settings
        settings_path = self.folder / "settings.json"
        if fresh:
            shutil.rmtree(self.variants, ignore_errors=True)
            settings_path.unlink(missing_ok=True)
        if settings_path.is_file():
            self._check_compatible(read_json(settings_path))
        self.variants.mkdir(parents=True, exist_ok=True)
        write_json(settings_path, settings)

    def _check_compatible(self, stored: dict[str, Any]) -> None:
        differ = [k for k in FINGERPRINT_KEYS if json.dumps(stored.get(k), sort_keys=True, default=str)
                  != json.dumps(self.settings.get(k), sort_keys=True, default=str)]
        if differ and any(self.variants.glob("*.json")):
            what = "; ".join(f"{k}: {stored.get(k)!r} there, {self.settings.get(k)!r} now" for k in differ[:3])
            raise UserError(
                f"{self.folder} holds a sweep made with other settings ({what}); rerun with --fresh to replace it "
                "or --out DIR to keep both"
            )

    def done(self) -> dict[int | None, VariantResult]:
        out: dict[int | None, VariantResult] = {}
        for path in sorted(self.variants.glob("*.json")):
            try:
                result = VariantResult.from_json(read_json(path))
            except (ValueError, KeyError, TypeError):
                continue  # a foreign or damaged file is rescored, never trusted
            out[result.removed_layer] = result
        return out

    def save(self, result: VariantResult) -> Path:
        return write_json(self.variants / f"{variant_name(result.removed_layer)}.json", result.to_json())


def plan_variants(layers: Iterable[int], done: dict[int | None, VariantResult]) -> list[int | None]:
    """Baseline first, then each selected layer; skip what is already stored."""
    wanted: list[int | None] = [None, *sorted(set(layers))]
    return [v for v in wanted if v not in done]


def run_naive(
    scorer: Scorer,
    todo: list[int | None],
    stack: LayerStack,
    store: ResultStore,
    *,
    on_start: Callable[[int | None], None] | None = None,
    on_done: Callable[[VariantResult], None] | None = None,
) -> None:
    """One full scoring pass per variant (the reference engine; works for every task type)."""
    for layer in todo:
        if on_start is not None:
            on_start(layer)
        start = time.perf_counter()
        with removed_layers(scorer.loaded.model, [] if layer is None else [layer], stack=stack):
            scores = scorer.score()
        result = VariantResult.of(layer, scores, time.perf_counter() - start, "naive")
        store.save(result)
        if on_done is not None:
            on_done(result)


# --- the tidy table ---------------------------------------------------------------------------

def retention(value: float, base: float, higher_is_better: bool) -> float:
    """Percent of the baseline kept; for lower-is-better metrics (perplexity) base/value."""
    if higher_is_better:
        return 100.0 * value / base if base else math.nan
    return 100.0 * base / value if value else math.nan


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
                "dead": dead, "effect": None if layer is None else "none" if dead else "helps" if better else "hurts",
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


def wide_frame(frame: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """One row per variant, ``task/metric`` value, stderr, Δ and dead columns, for spreadsheets."""
    wide = frame.drop_duplicates("variant")[["variant", "removed_layer", "angular_distance"]].reset_index(drop=True)
    sel = frame[frame["task"].isin(tasks)]
    for (task, metric), part in sel.groupby(["task", "metric"], sort=False):
        part = part.set_index("variant")
        for column, suffix in (("value", ""), ("stderr", "_stderr"), ("delta", "_delta"),
                               ("delta_stderr", "_delta_stderr"), ("dead", "_dead")):
            wide[f"{task}/{metric}{suffix}"] = wide["variant"].map(part[column])
    return wide
