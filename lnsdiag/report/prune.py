"""Layer-removal sweep report: the table, the dead-weight summary, CSVs, LaTeX and ΔP plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.table import Table

from ..runs import atomic_write, write_csv, write_json
from ..verdict import PERPLEXITY_LIKE, base_metric, headline_metrics, layers_with
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


#: How each verdict is shown.
VERDICT_STYLE = {"dead": "green", "hurts": "red", "helps": "cyan", "inconclusive": "yellow"}


def prune_table(frame: pd.DataFrame, tasks: list[str], title: str = "Layer removal") -> Table:
    """One row per variant: each task's main metric, Δ ± paired stderr, verdict, retention, angle."""
    heads = headline_metrics(frame, tasks)
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("removed", justify="right")
    for task, metric in heads:
        table.add_column(f"{task}\n{metric} ±stderr", justify="right")
        table.add_column("Δ ±stderr\n(paired)", justify="right")
        table.add_column("verdict")
        table.add_column("kept\n%", justify="right")
    has_angle = frame["angular_distance"].notna().any()
    if has_angle:
        table.add_column("angular", justify="right")
    several = len(heads) > 1
    if several:
        table.add_column("all metrics", no_wrap=True)
    for _, part in frame.groupby("variant", sort=False):
        layer = part["removed_layer"].iloc[0]
        cells = ["none (baseline)" if pd.isna(layer) else str(int(layer))]
        verdicts = []
        for task, metric in heads:
            row = part[(part["task"] == task) & (part["metric"] == metric)]
            if row.empty:
                cells += ["–", "–", "–", "–"]
                continue
            r = row.iloc[0]
            verdict = None if pd.isna(layer) else r["verdict"]
            verdicts.append(verdict)
            delta = "" if pd.isna(layer) else _signed(r["delta"], r["baseline"]) + (
                "" if pd.isna(r["delta_stderr"]) else f" ±{r['delta_stderr']:.{_digits(r['baseline'])}f}")
            style = VERDICT_STYLE.get(verdict or "", "")
            cells += [_fmt(r["value"], r["stderr"], r["baseline"]), delta,
                      f"[{style}]{verdict}[/{style}]" if verdict else "",
                      "" if pd.isna(layer) else _fmt(r["retention"], scale=100)]
        if has_angle:
            cells.append(_fmt(part["angular_distance"].iloc[0]))
        if several:
            dead = sum(v == "dead" for v in verdicts)
            cells.append("" if pd.isna(layer) else "[green]dead weight[/green]" if dead == len(heads)
                         else f"dead on {dead}/{len(heads)}" if dead else "")
        table.add_row(*cells, end_section=pd.isna(layer))
    return table


def prune_summary(frame: pd.DataFrame, tasks: list[str]) -> list[str]:
    """Per headline metric: how many removed layers are dead / hurt / help / inconclusive, and which."""
    lines = []
    for task, metric in headline_metrics(frame, tasks):
        part = frame[(frame["task"] == task) & (frame["metric"] == metric) & frame["removed_layer"].notna()]
        counts = {v: layers_with(frame, task, metric, v) for v in VERDICT_STYLE}
        line = (f"{task} ({metric}), {len(part)} removed layers: " +
                ", ".join(f"{len(layers)} {name}" for name, layers in counts.items()))
        if counts["dead"]:
            line += f"; dead weight: {', '.join(map(str, counts['dead']))}"
        if counts["helps"]:
            line += f"; removing {', '.join(map(str, counts['helps']))} significantly improves it"
        needed = part.loc[part["verdict"] == "inconclusive", "documents_needed"].dropna()
        if len(needed):
            line += (f"; inconclusive: the data cannot tell (≈{int(needed.median()):,} documents would show "
                     "equivalence with 80% power at the observed spread, if it holds)")
        lines.append(line)
    return lines


def plot_prune(frame: pd.DataFrame, tasks: list[str], stem: Path, title: str = "") -> list[Path]:
    """Δ per removed layer, one panel per task, with the paired 90% interval the verdict uses (dead
    when it lies inside the dotted margin); dead layers shaded green, inconclusive ones hatched.

    Perplexity-like metrics are drawn as % of the baseline on a symmetric-log axis, linear within
    the margin, so a removal that multiplies perplexity does not flatten every other layer;
    bounded metrics (accuracy) in points.
    """
    plt = pyplot()
    heads = headline_metrics(frame, tasks)
    fig, axes = plt.subplots(len(heads), 1, figsize=(6.4, 2.4 * len(heads) + 0.6), sharex=True, squeeze=False,
                             layout="constrained")
    for ax, (task, metric) in zip(axes[:, 0], heads, strict=True):
        part = frame[(frame["task"] == task) & (frame["metric"] == metric) & frame["removed_layer"].notna()]
        x = part["removed_layer"].astype(int).to_numpy()
        relative = base_metric(metric) in PERPLEXITY_LIKE
        scale = 100.0 / part["baseline"].to_numpy(dtype=float) if relative else np.full(len(part), 100.0)
        delta = part["delta"].to_numpy(dtype=float) * scale
        low = delta - part["ci90_low"].to_numpy(dtype=float) * scale
        high = part["ci90_high"].to_numpy(dtype=float) * scale - delta
        known = np.isfinite(low) & np.isfinite(high)
        for layer, verdict in zip(x, part["verdict"], strict=True):
            if verdict == "dead":
                ax.axvspan(layer - 0.5, layer + 0.5, color="tab:green", alpha=0.15, lw=0)
            elif verdict == "inconclusive":
                ax.axvspan(layer - 0.5, layer + 0.5, facecolor="none", edgecolor="0.6", hatch="///", lw=0)
        ax.axhline(0, color="black", lw=0.8, label="baseline (no layer removed)")
        margin = float((part["margin"] * scale).iloc[0]) if len(part) else math.nan
        if math.isfinite(margin) and margin > 0:
            for sign in (-1, 1):
                ax.axhline(sign * margin, color="tab:green", lw=0.8, ls=":",
                           label="margin of equivalence" if sign > 0 else None)
            if relative:
                from matplotlib.ticker import FuncFormatter

                ax.set_yscale("symlog", linthresh=margin)
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:+g}%" if v else "0"))
        yerr = np.vstack([np.where(known, low, 0), np.where(known, high, 0)]) if known.any() else None
        ax.errorbar(x, delta, yerr=yerr, marker="o", ms=3, lw=1.2, capsize=2,
                    label="Δ with its paired 90% interval")
        ax.set_ylabel(f"Δ{metric} (% of baseline)" if relative else f"Δ{metric} (points)")
        ax.set_title(f"{task} — shaded: dead, hatched: inconclusive", fontsize=9, loc="left")
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
                latex_escape(f"{r['delta']:+.4g}") + (r"$^\dagger$" if r["verdict"] == "dead" else
                                                      r"$^\ast$" if r["verdict"] == "hurts" else ""))
        if frame["angular_distance"].notna().any():
            row["angular dist."] = part["angular_distance"].iloc[0]
        rows.append(row)
    caption = caption or (r"One-layer removal: metric of each variant and $\Delta$ to the full model. "
                          r"$^\dagger$: dead weight (the paired 90\% interval of $\Delta$ lies within the margin "
                          r"of equivalence); $^\ast$: removal significantly hurts (Holm-adjusted, $\alpha = 0.05$).")
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
                               ("delta_stderr", "_delta_stderr"), ("verdict", "_verdict"), ("dead", "_dead")):
            wide[f"{task}/{metric}{suffix}"] = wide["variant"].map(part[column])
    return wide
