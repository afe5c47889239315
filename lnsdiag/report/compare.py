"""Comparison report: per-metric tables, compare.csv, overlay plots (PNG + PDF) and LaTeX tables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

from ..compare import LOG_METRICS, Comparison
from ..runs import atomic_write, write_csv, write_json
from .common import frame_to_latex, latex_escape, pyplot, save_figure


def _depth(row: Any) -> str:
    return f"{row.depth_from:.0%}–{row.depth_to:.0%}"


def _fmt(value: float) -> str:
    return "" if value != value else f"{value:.4g}"


def compare_tables(comparison: Comparison) -> list[Table]:
    """One table per metric: rows are slices of relative depth, columns the runs."""
    tables = []
    layers = ", ".join(f"{r.label}: {r.num_layers}" for r in comparison.runs)
    for metric in comparison.metrics:
        cols = comparison.columns(metric)
        table = Table(title=metric, title_justify="left", header_style="bold",
                      caption=f"layers — {layers}", caption_justify="left")
        table.add_column("rel. depth", justify="right")
        for col in cols:
            table.add_column(col.split(" | ", 1)[1], justify="right")
        for row in comparison.table.itertuples():
            table.add_row(_depth(row), *(_fmt(comparison.table.at[row.Index, c]) for c in cols))
        tables.append(table)
    return tables


def _slug(metric: str) -> str:
    return re.sub(r"[^\w]+", "_", metric.replace("%", "pct")).strip("_").lower()


def plot_compare(comparison: Comparison, metric: str, stem: Path, title: str = "") -> list[Path]:
    """Each run's own layers at relative depth (l + 0.5) / L, one line per run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for run in comparison.runs:
        if metric not in run.metrics:
            continue
        series = run.series(metric)
        ax.plot(series["rel_depth"], series["value"], marker="o", ms=3, lw=1.3,
                label=f"{run.label} ({run.num_layers} layers)")
    if metric in LOG_METRICS:
        ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("relative depth (l + 0.5) / L")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} across depth")
    ax.legend(frameon=False, fontsize=8)
    return save_figure(fig, stem)


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
