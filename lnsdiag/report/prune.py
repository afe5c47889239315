"""Layer-removal sweep report: the table, the dead-weight summary, CSVs, LaTeX and ΔP plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

from ..runs import atomic_write, write_csv, write_json
from ..verdict import dead_layers, headline_metrics
from .common import LatexRaw, frame_to_latex, latex_escape, pyplot, save_figure


def _digits(scale: float) -> int:
    """Decimals that keep ~4 significant digits of a metric of this magnitude."""
    scale = abs(scale)
    return 1 if scale >= 100 else 2 if scale >= 10 else 3 if scale >= 1 else 4


def _fmt(value: float, stderr: float | None = None, scale: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    d = _digits(value if scale is None else scale)
    text = f"{value:.{d}f}"
    if stderr is not None and not math.isnan(stderr):
        text += f" ±{stderr:.{d}f}"
    return text


def _signed(value: float, scale: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:+.{_digits(scale)}f}"


def prune_table(frame: pd.DataFrame, tasks: list[str], title: str = "Layer removal") -> Table:
    """One row per variant: each task's main metric, Δ, retention, angular distance, dead mark."""
    heads = headline_metrics(frame, tasks)
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("removed", justify="right")
    for task, metric in heads:
        table.add_column(f"{task}\n{metric} ±stderr", justify="right")
        table.add_column("Δ ±stderr", justify="right")
        table.add_column("kept\n%", justify="right")
    has_angle = frame["angular_distance"].notna().any()
    if has_angle:
        table.add_column("angular", justify="right")
    table.add_column("", no_wrap=True)
    for _, part in frame.groupby("variant", sort=False):
        layer = part["removed_layer"].iloc[0]
        cells = ["none (baseline)" if pd.isna(layer) else str(int(layer))]
        all_dead = not pd.isna(layer)
        dead_count = helps = 0
        for task, metric in heads:
            row = part[(part["task"] == task) & (part["metric"] == metric)]
            if row.empty:
                cells += ["–", "–", "–"]
                all_dead = False
                continue
            r = row.iloc[0]
            dead = bool(r["dead"]) if not pd.isna(r["dead"]) else False
            all_dead &= dead
            dead_count += dead
            helps += r["effect"] == "helps"
            color = "" if pd.isna(layer) else ("green" if dead else "cyan" if r["effect"] == "helps" else "red")
            delta = "" if pd.isna(layer) else _signed(r["delta"], r["baseline"]) + (
                "" if pd.isna(r["delta_stderr"]) else f" ±{r['delta_stderr']:.{_digits(r['baseline'])}f}")
            cells += [_fmt(r["value"], r["stderr"], r["baseline"]), f"[{color}]{delta}[/{color}]" if color else delta,
                      "" if pd.isna(layer) else f"{r['retention']:.1f}"]
        if has_angle:
            cells.append(_fmt(part["angular_distance"].iloc[0]))
        mark = ("[green]dead weight[/green]" if all_dead else
                f"[yellow]dead on {dead_count}/{len(heads)}[/yellow]" if dead_count else "")
        if helps:
            mark += (" " if mark else "") + "[cyan]removal helps[/cyan]"
        cells.append(mark)
        table.add_row(*cells, end_section=pd.isna(layer))
    return table


def prune_summary(frame: pd.DataFrame, tasks: list[str], tolerance: float = 0.01) -> list[str]:
    """'14 of 32 removed layers are dead weight on mmlu (acc): 17, 18, ...' per task."""
    lines = []
    layers = frame["removed_layer"].dropna().unique()
    for task, metric in headline_metrics(frame, tasks):
        dead = dead_layers(frame, task, metric)
        where = ", ".join(map(str, dead)) if dead else "none"
        part = frame[(frame["task"] == task) & (frame["metric"] == metric)]
        noise = "" if part["delta_stderr"].notna().any() else f", no stderr: |Δ| ≤ {tolerance:g} alone"
        line = f"{len(dead)} of {len(layers)} removed layers are dead weight on {task} ({metric}{noise}): {where}"
        helps = [int(x) for x in part.loc[part["effect"] == "helps", "removed_layer"]]
        if helps:
            line += f"; removing {', '.join(map(str, helps))} significantly improves it"
        lines.append(line)
    return lines


def plot_prune(frame: pd.DataFrame, tasks: list[str], stem: Path, title: str = "") -> list[Path]:
    """ΔP per removed layer, one panel per task: ±2 stderr bars, baseline at 0, dead layers shaded."""
    plt = pyplot()
    heads = headline_metrics(frame, tasks)
    fig, axes = plt.subplots(len(heads), 1, figsize=(6.4, 2.4 * len(heads) + 0.4), sharex=True, squeeze=False)
    for ax, (task, metric) in zip(axes[:, 0], heads, strict=True):
        part = frame[(frame["task"] == task) & (frame["metric"] == metric) & frame["removed_layer"].notna()]
        x = part["removed_layer"].astype(int).to_numpy()
        err = 2 * part["delta_stderr"].fillna(0).to_numpy()
        for layer in part.loc[part["dead"].fillna(False).astype(bool), "removed_layer"].astype(int):
            ax.axvspan(layer - 0.5, layer + 0.5, color="tab:green", alpha=0.12, lw=0)
        ax.axhline(0, color="black", lw=0.8, label="baseline (no layer removed)")
        ax.errorbar(x, part["delta"], yerr=err if err.any() else None, marker="o", ms=3, lw=1.2, capsize=2,
                    label=f"Δ{metric} (±2 stderr)")
        ax.set_ylabel(f"Δ {metric}")
        ax.set_title(f"{task}" + (" — shaded: dead weight" if part["dead"].fillna(False).any() else ""),
                     fontsize=9, loc="left")
        if ax is axes[0, 0]:
            ax.legend(frameon=False, fontsize=7, loc="best")
    from matplotlib.ticker import MaxNLocator

    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("removed layer (0-based)")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, stem)


def latex_table(frame: pd.DataFrame, tasks: list[str], caption: str = "") -> str:
    heads = headline_metrics(frame, tasks)
    rows = []
    for _, part in frame.groupby("variant", sort=False):
        layer = part["removed_layer"].iloc[0]
        row: dict[str, Any] = {"removed layer": "none" if pd.isna(layer) else int(layer)}
        for task, metric in heads:
            r = part[(part["task"] == task) & (part["metric"] == metric)]
            if r.empty:
                continue
            r = r.iloc[0]
            row[f"{task} {metric}"] = r["value"]
            row[f"{task} Δ"] = "" if pd.isna(layer) else LatexRaw(
                latex_escape(f"{r['delta']:+.4g}") + (r"$^\dagger$" if r["dead"] else ""))
        if frame["angular_distance"].notna().any():
            row["angular dist."] = part["angular_distance"].iloc[0]
        rows.append(row)
    caption = caption or (r"One-layer removal: metric of each variant and $\Delta$ to the full model. "
                          r"$^\dagger$: dead weight ($|\Delta| \le \max(\mathrm{tol}, 2\,\mathrm{stderr})$).")
    return frame_to_latex(pd.DataFrame(rows, dtype=object), caption=caption, label="tab:layer-removal")


def write_prune(frame: pd.DataFrame, tasks: list[str], out: Path, meta: dict[str, Any], *, plots: bool = True,
                title: str = "") -> list[Path]:
    """prune.csv (tidy), prune_wide.csv, prune.tex, meta.json and prune.png/pdf."""
    files = [write_csv(out / "prune.csv", frame), write_csv(out / "prune_wide.csv", wide_frame(frame, tasks)),
             atomic_write(out / "prune.tex", latex_table(frame, tasks))]
    if plots and frame["removed_layer"].notna().any():
        files += plot_prune(frame, tasks, out / "prune", title)
    files.append(write_json(out / "meta.json", meta))
    return files


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
