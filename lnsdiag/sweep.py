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
FINGERPRINT_KEYS = ("model", "revision", "weights", "dtype", "tasks", "task_versions", "include_path", "num_fewshot",
                    "limit", "seed", "bootstrap_iters", "ppl_text", "ppl_max_tokens", "seq_len", "layers_path",
                    "max_length")


#: The fast engine's partial results while a pass runs.
CHECKPOINT_NAME = "engine-partial.npz"
#: Outputs of a previous run that ``--fresh`` removes with it.
FRESH_FILES = ("angular.csv", "angular_settings.json", "prune.csv", "prune_wide.csv", "prune.tex", "prune.png",
               "prune.pdf", "meta.json")


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
        if fresh:  # everything a previous run left: stored variants, partial pass, cached angles, outputs
            shutil.rmtree(self.variants, ignore_errors=True)
            for name in ("settings.json", CHECKPOINT_NAME, *FRESH_FILES):
                (self.folder / name).unlink(missing_ok=True)
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


def window_requests(windows: list[Any], tokenizer: Any) -> tuple[list[Any], int]:
    """Perplexity windows as engine requests: the prefix (BOS) is context, the rest is scored."""
    from .engine import TokenRequest
    from .text import context_tokens

    skip = context_tokens(tokenizer)
    return [TokenRequest(tuple(w[:skip].tolist()), tuple(w[skip:].tolist())) for w in windows], skip


def perplexity_sweep(loaded: Any, windows: list[Any], layers: Iterable[int] | None = None, *,
                     batch_tokens: int | None = None, tolerance: float = 0.01, angular: pd.DataFrame | None = None,
                     progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """Built-in perplexity of the full model and of each one-layer-removed variant, in one pass.

    The same numbers, paired stderr and dead-weight rule as ``lnsdiag prune --ppl-text``,
    without a result folder: the rows of :func:`prune_frame` for the ``ppl`` metric, plus the
    number of scored ``tokens``.
    """
    from .engine import SweepEngine
    from .scoring import window_bytes
    from .surgery import find_layers

    stack = find_layers(loaded.model)
    chosen = list(range(len(stack))) if layers is None else sorted(set(layers))
    variants: list[int | None] = [None, *chosen]
    requests, skip = window_requests(windows, loaded.tokenizer)
    engine = SweepEngine(loaded.model, stack, variants, batch_tokens=batch_tokens)
    result = engine.run(requests, max(len(w) for w in windows), progress=progress)
    counts = [len(w) - skip for w in windows]
    sizes = window_bytes(loaded.tokenizer, windows, skip)
    results = {}
    for variant in variants:
        ppl = Perplexity([-float(x) for x in result.of(variant)[0]], counts, sizes)
        results[variant] = VariantResult(variant, ppl.rows(), 0.0, "fast", ppl=ppl)
    frame = prune_frame(results, tolerance=tolerance, angular=angular)
    frame = frame[frame["metric"] == "ppl"].reset_index(drop=True)
    frame["tokens"] = sum(counts)
    return frame


def run_fast(
    scorer: Scorer,
    todo: list[int | None],
    stack: LayerStack,
    store: ResultStore,
    *,
    batch_tokens: int | None = None,
    on_phase: Callable[[str], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_done: Callable[[VariantResult], None] | None = None,
) -> dict[str, Any]:
    """All variants from one engine pass, then lm-eval's aggregation per variant (a replay).

    Tasks that generate text cannot be served from log-likelihoods: they run the naive way,
    inside the same loop. Returns what was done (for meta.json).
    """
    from .engine import Checkpoint, SweepEngine, fingerprint
    from .scoring import (
        RequestLog,
        collect_requests,
        evaluate_tasks,
        replay_metrics,
        seed_everything,
        tidy_metrics,
        window_bytes,
    )
    note = on_phase or (lambda _m: None)
    model, tokenizer = scorer.loaded.model, scorer.loaded.tokenizer
    fast_tasks = slow_tasks = None
    if scorer.tasks is not None:
        fast_names, slow_names = scorer.tasks.split_by_output()
        fast_tasks = scorer.tasks.subset(fast_names) if fast_names else None
        slow_tasks = scorer.tasks.subset(slow_names) if slow_names else None
    log = RequestLog()
    if fast_tasks is not None:
        note("building lm-eval requests (once)")
        log = collect_requests(scorer.lm, fast_tasks, limit=scorer.limit, seed=scorer.seed)
    requests = log.token_requests()
    n_task = len(requests)
    windows = scorer.ppl_windows or []
    ppl_requests, skip = window_requests(windows, tokenizer)
    requests += ppl_requests
    longest = max((len(w) for w in windows), default=0)
    max_length = scorer.lm.max_length if scorer.lm is not None else longest - 1
    if longest - 1 > max_length:
        raise UserError(f"perplexity windows of {longest} tokens exceed lm-eval's context length ({max_length}); "
                        "lower --seq-len")
    checkpoint = Checkpoint(store.folder / CHECKPOINT_NAME,
                            fingerprint(requests, max_length, {"settings": store.settings}))
    stored = checkpoint.stored_variants()
    variants = stored if stored is not None and set(todo) <= set(stored) else list(todo)  # finish that pass
    engine = SweepEngine(model, stack, variants, batch_tokens=batch_tokens, pad_id=0)
    note(f"scoring {len(requests):,} requests for {len(variants)} variants in one pass")
    start = time.perf_counter()
    result = engine.run(requests, max_length, progress=on_progress, checkpoint=checkpoint) if requests else None
    engine_seconds = time.perf_counter() - start
    share = engine_seconds / max(1, len(variants))
    counts = [len(w) - skip for w in windows]  # the same windows for every variant: decode them once
    sizes = window_bytes(tokenizer, windows, skip)
    for variant in todo:
        start = time.perf_counter()
        note("aggregating metrics" if variant is None else f"aggregating metrics without layer {variant}")
        rows: list[MetricRow] = []
        ppl = None
        if result is not None:
            loglik, greedy = result.of(variant)
        if fast_tasks is not None:
            single, rolling = log.tables(loglik[:n_task], greedy[:n_task])
            rows += replay_metrics(fast_tasks, single, rolling, limit=scorer.limit, seed=scorer.seed,
                                   bootstrap_iters=scorer.bootstrap_iters)
        if slow_tasks is not None:
            seed_everything(scorer.seed)
            with removed_layers(model, [] if variant is None else [variant], stack=stack):
                rows += tidy_metrics(evaluate_tasks(scorer.lm, slow_tasks, limit=scorer.limit, seed=scorer.seed,
                                                    bootstrap_iters=scorer.bootstrap_iters))
        if windows:
            ppl = Perplexity([-float(x) for x in loglik[n_task:]], counts, sizes)
            rows += ppl.rows()
        saved = VariantResult(variant, rows, share + time.perf_counter() - start, "fast", ppl=ppl)
        store.save(saved)
        if on_done is not None:
            on_done(saved)
    checkpoint.path.unlink(missing_ok=True)
    return {"variants_in_pass": len(variants), "engine_seconds": round(engine_seconds, 3),
            "requests": len(requests), "task_requests": n_task,
            "model_rows": engine.stats.get("rows"), "packed_rows": engine.stats.get("packed_rows"),
            "tokens": engine.stats.get("tokens"), "tokens_without_sharing": engine.stats.get("unshared_tokens"),
            "packing": engine.stats.get("packing"), "batch_tokens": engine.stats.get("budget"),
            "fast_tasks": fast_tasks.names if fast_tasks else [], "naive_tasks": slow_tasks.names if slow_tasks else [],
            "layer_passes_per_row": engine.layer_passes()}


# --- the tidy table ---------------------------------------------------------------------------

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
