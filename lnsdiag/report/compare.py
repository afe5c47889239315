"""Comparison report: per-metric tables, compare.csv, overlay plots (PNG + PDF) and LaTeX tables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from ..runners.compare import LOG_METRICS, Comparison
from ..runs import atomic_write, write_csv, write_json
from .common import (
    SINGLE_COLUMN,
    TITLE_INSET,
    Col,
    Tables,
    TableSpec,
    figure,
    frame_to_latex,
    large_spread,
    latex_escape,
    save_figure,
    styled,
    wrap,
)

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _depth(row: Any) -> str:
    return f"{row.depth_from:.0%}–{row.depth_to:.0%}"


def _fmt(value: float) -> str:
    return "" if value != value else f"{value:.4g}"


def compare_tables(comparison: Comparison) -> Tables:
    """One table per metric: rows are slices of relative depth, a column per run (split when many)."""
    layers = ", ".join(f"{r.label}: {r.num_layers}" for r in comparison.runs)
    depth = Col("rel. depth", [_depth(row) for row in comparison.table.itertuples()])
    specs = []
    for metric in comparison.metrics:
        groups = [[Col(col.split(" | ", 1)[1], [_fmt(v) for v in comparison.table[col]])]
                  for col in comparison.columns(metric)]
        specs.append(TableSpec(metric, [depth], groups, caption=f"layers — {layers}"))
    return Tables(*specs)


def _slug(metric: str) -> str:
    return re.sub(r"[^\w]+", "_", metric.replace("%", "pct")).strip("_").lower()


@styled
def compare_figure(comparison: Comparison, metric: str, title: str = "") -> Any:
    """Each run's own layers at relative depth (l + 0.5) / L, one line per run (colour and marker)."""
    from matplotlib.ticker import PercentFormatter

    runs = [(i, run) for i, run in enumerate(comparison.runs) if metric in run.metrics]
    labels = [f"{run.label} ({run.num_layers} layers)" for _, run in runs]
    below = len(labels) > 3 or max(map(len, labels), default=0) > 28  # a legend below the axes, wrapped
    columns = 2 if max(map(len, labels), default=0) <= 28 else 1
    labels = [wrap(label, SINGLE_COLUMN / columns - 0.4, 7) for label in labels] if below else labels
    lines = sum(label.count("\n") + 1 for label in labels[::columns]) if below else 0
    fig, axes = figure(SINGLE_COLUMN, 2.5 + 0.14 * lines)  # the axes keep their height; the legend adds its own
    ax = axes[0, 0]
    values = []
    for (i, run), label in zip(runs, labels, strict=True):
        series = run.series(metric)
        values += list(series["value"])
        ax.plot(series["rel_depth"], series["value"], marker=MARKERS[i % len(MARKERS)],
                ms=3 if run.num_layers <= 40 else 1.5, lw=1.0, label=label)
    positive = [v for v in values if v == v and v > 0]
    if metric in LOG_METRICS or (len(positive) == len(values) and large_spread(positive, 0.0)):
        ax.set_yscale("log")
        metric_label = f"{metric} (log)"
    else:
        metric_label = metric
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel("relative depth (ℓ + 0.5) / L")
    ax.set_ylabel(wrap(metric_label.replace("_", " "), 2.0))
    ax.set_title(wrap(title or f"{metric} across depth", SINGLE_COLUMN - TITLE_INSET))
    if below:
        fig.legend(loc="outside lower center", ncols=columns)
    else:
        ax.legend()
    return fig


def plot_compare(comparison: Comparison, metric: str, stem: Path, title: str = "") -> list[Path]:
    """:func:`compare_figure` as ``stem``.png (a glance) and .pdf (vector, for a paper)."""
    return save_figure(compare_figure(comparison, metric, title), stem)


def latex_tables(comparison: Comparison) -> str:
    """One booktabs table per metric, columns the runs, rows the depth slices."""
    chunks = []
    for metric in comparison.metrics:
        cols = comparison.columns(metric)
        frame = pd.DataFrame({"depth": [_depth(r) for r in comparison.table.itertuples()]})
        for col in cols:
            frame[col.split(" | ", 1)[1]] = comparison.table[col]
        frame["depth"] = frame["depth"].str.replace("–", "--")
        chunks.append(frame_to_latex(frame, caption=f"{latex_escape(metric)} by relative depth "
                                     f"(layers averaged over {comparison.bins} equal slices of depth).",
                                     label=f"tab:compare-{_slug(metric)}"))
    return "\n".join(chunks)


def write_compare(comparison: Comparison, out: Path, meta: dict[str, Any]) -> list[Path]:
    """compare.csv (aligned), compare_layers.csv (each run's own layers), compare.tex, plots, meta.json."""
    long = pd.concat([run.series(m).assign(run=run.label, num_layers=run.num_layers)
                      for run in comparison.runs for m in run.metrics], ignore_index=True)
    long = long[["run", "metric", "layer", "num_layers", "rel_depth", "value"]]
    files = [write_csv(out / "compare.csv", comparison.table), write_csv(out / "compare_layers.csv", long),
             atomic_write(out / "compare.tex", latex_tables(comparison))]
    for metric in comparison.metrics:
        files += plot_compare(comparison, metric, out / f"compare_{_slug(metric)}")
    files.append(write_json(out / "meta.json", meta))
    return files
