"""lm-eval's own aggregation applied to per-document metric items, and lm-eval's results dict
as tidy rows (:func:`tidy_metrics`, :func:`scores_of`).

The aggregations are looked up by lm-eval's registry name, so a paired comparison can apply a
metric's own aggregation to resampled items (:func:`aggregation_function`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..base import LOWER_IS_BETTER, MetricRow, Scores
from .tasks import TaskSet


def aggregate_task(task: Any, raw: dict[tuple[str, str], list[Any]], bootstrap_iters: int | None
                   ) -> tuple[dict[str, Any], int]:
    """A task's metrics and stderrs from its per-document items, as lm-eval's evaluator computes
    them: the task's aggregation (``mean`` where it has none), ``stderr_for_metric`` (closed form
    or lm-eval's seeded bootstrap, capped at 100 draws for bleu/chrf/ter), "N/A" where none."""
    from lm_eval.api.metrics import mean, stderr_for_metric

    entry: dict[str, Any] = {}
    sample_len = 0
    functions = task.aggregation()
    for (metric, key), items in raw.items():
        try:
            function = functions[metric]
        except KeyError:
            function = mean
        entry[f"{metric},{key}"] = function(items)
        sample_len = max(sample_len, len(items))
        stderr: Any = "N/A"
        if isinstance(bootstrap_iters, int) and bootstrap_iters > 0:
            iters = min(bootstrap_iters, 100) if metric in ("bleu", "chrf", "chrf++", "ter") else bootstrap_iters
            stderr_fn = stderr_for_metric(metric=function, bootstrap_iters=iters)
            if stderr_fn is not None and len(items) > 1:
                stderr = stderr_fn(items)
        entry[f"{metric}_stderr,{key}"] = stderr
    return entry, sample_len


# --- the registry of lm-eval's aggregations ---------------------------------------------------

def _registry() -> Any:
    import lm_eval.api.metrics  # noqa: F401  (registers lm-eval's aggregations)
    from lm_eval.api.registry import AGGREGATION_REGISTRY

    return AGGREGATION_REGISTRY


def aggregation_name(function: Any) -> str:
    """lm-eval's registry name of an aggregation function (``mean``, ``weighted_perplexity``...);
    ``custom:<name>`` for a task's own function (it cannot be looked up again by name)."""
    registry = _registry()
    for name in list(registry):
        try:
            if registry.get(name) is function:
                return str(name)
        except KeyError:
            continue
    return f"custom:{getattr(function, '__qualname__', getattr(function, '__name__', str(function)))}"


def aggregation_function(name: str) -> Any:
    """The aggregation function lm-eval registers under ``name``, or None (a task's own function)."""
    if not name or name.startswith("custom:"):
        return None
    try:
        return _registry().get(name)
    except KeyError:
        return None


# --- two results dicts compared ---------------------------------------------------------------

def results_difference(got: dict[str, Any], want: dict[str, Any]) -> str | None:
    """Where two lm-eval results dicts disagree (metrics, stderrs, per-document items), or None."""
    if list(got["results"]) != list(want["results"]):
        return f"tasks/groups {list(got['results'])} vs {list(want['results'])}"
    for name, entry in want["results"].items():
        mine = got["results"][name]
        if list(mine) != list(entry):
            return f"{name}: keys {list(mine)} vs {list(entry)}"
        for key, value in entry.items():
            if not _same_item(mine[key], value):
                return f"{name}: {key} is {mine[key]!r}, lm-eval gives {value!r}"
    for name, examples in (want.get("samples") or {}).items():
        mine_examples = (got.get("samples") or {}).get(name, [])
        if len(mine_examples) != len(examples):
            return f"{name}: {len(mine_examples)} documents vs {len(examples)}"
        for a, b in zip(mine_examples, examples, strict=True):
            fields = ("doc_id", "filter", "metrics", "arguments", *b["metrics"])
            for key in fields:
                if not _same_item(a.get(key), b.get(key)):
                    return f"{name}: document {b['doc_id']}: {key} is {a.get(key)!r}, lm-eval gives {b.get(key)!r}"
    return None


def _same_item(a: Any, b: Any) -> bool:
    """Exact equality of metric items (floats, NaN, tuples, numpy arrays)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_item(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_item(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return repr(a) == repr(b)


# --- lm-eval's results as tidy rows -----------------------------------------------------------

def scores_of(results: dict[str, Any], tasks: TaskSet) -> Scores:
    """Tidy rows, and (when lm-eval logged samples) what paired comparisons need: each document's
    metric items, each metric's aggregation (by lm-eval's registry name), each group's leaf
    tasks, and each multiple-choice document's number of choices."""
    documents: dict[tuple[str, str], dict[Any, Any]] = {}
    aggregations: dict[tuple[str, str], str] = {}
    choices: dict[str, dict[Any, int]] = {}
    for task, examples in (results.get("samples") or {}).items():
        task_obj = tasks.leaf_tasks.get(task)
        functions = task_obj.aggregation() if task_obj is not None else {}
        multiple_choice = getattr(task_obj, "OUTPUT_TYPE", "") == "multiple_choice"
        names = {metric: aggregation_name(function) for metric, function in functions.items()}
        for example in examples:
            filt = example.get("filter", "none")
            for metric in example["metrics"]:
                name = metric if filt in ("none", "") else f"{metric}[{filt}]"
                documents.setdefault((task, name), {})[example["doc_id"]] = example[metric]
                if metric in names:
                    aggregations[(task, name)] = names[metric]
            if multiple_choice:  # distinct continuations: mutual-information tasks score each choice twice
                choices.setdefault(task, {})[example["doc_id"]] = len({tuple(a)[-1] for a in example["arguments"]})
    groups = {group: tasks.leaves_of(group) or [] for group in results.get("group_subtasks", {})
              if group not in tasks.leaf_tasks}
    return Scores(tidy_metrics(results), documents=documents, choices=choices, aggregations=aggregations,
                  groups=groups)


def tidy_metrics(results: dict[str, Any]) -> list[MetricRow]:
    """lm-eval's nested results as rows: every task and group, every metric, with its stderr."""
    rows = []
    higher = results.get("higher_is_better", {})
    groups = set(results.get("groups", {})) | set(results.get("group_subtasks", {}))
    samples = results.get("n-samples", {})
    for task, entry in results["results"].items():
        for key, value in entry.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("none", "") else f"{metric}[{filt}]"
            stderr = _number(entry.get(f"{metric}_stderr,{filt}"))
            hib = higher.get(task, {}).get(metric, metric not in LOWER_IS_BETTER)
            count = samples.get(task, {}).get("effective") if isinstance(samples.get(task), dict) else None
            if count is None and isinstance(entry.get("sample_len"), int):
                count = entry["sample_len"]
            rows.append(MetricRow(task, name, float(value), stderr, bool(hib), count, task in groups))
    return rows


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
