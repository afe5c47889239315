"""Layer-removal sweep report: the table, the dead-weight summary, LaTeX and ΔP plots (the CSVs are the
run's own: :meth:`~lnsdiag.runners.prune.PruneRun.write`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..results.margins import BUILTIN_GENERATION_TASK, LOG_LIKELIHOOD, PERPLEXITY_LIKE, base_metric, comparison_of
from ..results.verdict import headline_metrics, layers_with, of_unit, unit_kinds
from ..runs import atomic_write
from .common import (
    DOUBLE_COLUMN,
    PALETTE,
    Col,
    LatexRaw,
    Tables,
    TableSpec,
    figure,
    frame_to_latex,
    large_spread,
    latex_escape,
    layer_axis,
    save_figure,
    signed_formatter,
    styled,
    wrap,
)


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


#: How each verdict is shown on the terminal.
VERDICT_STYLE = {"dead": "green", "hurts": "red", "helps": "cyan", "inconclusive": "yellow"}


def _verdict(verdict: Any) -> str:
    if not isinstance(verdict, str) or not verdict:
        return ""
    style = VERDICT_STYLE.get(verdict, "")
    return f"[{style}]{verdict}[/{style}]" if style else verdict


def prune_table(frame: pd.DataFrame, tasks: list[str], title: str = "Layer removal") -> Tables:
    """One table per task's main metric (value ± stderr, paired Δ ± stderr, verdict, retention, angle),
    then, for several tasks, each layer's verdicts side by side: split, never squeezed, to fit the width.
    How far the output moved from the full model's (``fidelity``, ``generation``: KL, its verdict, top-1
    agreement) are columns of the table of what was scored on the same tokens (the perplexity, a task),
    or a table of their own when that task is not shown."""
    heads = headline_metrics(frame, tasks)
    variants = list(frame.groupby("variant", sort=False))
    layers = [part["removed_layer"].iloc[0] for _, part in variants]
    removed = Col("removed", [_removed_text(part) for _, part in variants])
    sections = frozenset(i for i, layer in enumerate(layers) if pd.isna(layer))
    angular = Col("ang. dist.", [_fmt(part["angular_distance"].iloc[0]) if pd.notna(layer) else ""
                                 for (_, part), layer in zip(variants, layers, strict=True)])
    specs = []
    verdicts: dict[str, list[str | None]] = {}
    scored = {task for task, _ in heads if comparison_of(task) is None}
    beside: dict[str, list[list[Col]]] = {}
    for task, _ in heads:
        if comparison_of(task) is not None:
            cols = _comparison_cols(frame, variants, layers, task)
            verdicts[f"{task} (kl)"] = [v for v, layer in zip(cols[1].cells, layers, strict=True) if pd.notna(layer)]
            cols[1] = Col(cols[1].header, [_verdict(v) for v in cols[1].cells], "left")
            on = comparison_of(task)[1]
            if on in scored:
                beside.setdefault(on, []).append(cols)
            else:
                specs.append(TableSpec(f"{title} — {task}", [removed], [cols, [angular]], sections=sections))
    for task, metric in heads:
        if comparison_of(task) is not None:
            continue
        cells: list[tuple[str, str, str, str]] = []  # value, Δ, verdict, kept
        for (_, part), layer in zip(variants, layers, strict=True):
            row = part[(part["task"] == task) & (part["metric"] == metric)]
            r = None if row.empty else row.iloc[0]
            if r is None or pd.isna(layer):
                cells.append(("–" if r is None else _fmt(r["value"], r["stderr"], r["baseline"]), "", "", ""))
                if pd.notna(layer):
                    verdicts.setdefault(task, []).append(None)
                continue
            se = "" if pd.isna(r["delta_stderr"]) else f" ±{r['delta_stderr']:.{_digits(r['baseline'])}f}"
            cells.append((_fmt(r["value"], r["stderr"], r["baseline"]), _signed(r["delta"], r["baseline"]) + se,
                          _verdict(r["verdict"]), _fmt(r["retention"], scale=100)))
            verdicts.setdefault(task, []).append(r["verdict"] if isinstance(r["verdict"], str) else None)
        value, delta, verdict, kept = (list(c) for c in zip(*cells, strict=True))
        name = task if task == metric else f"{task} ({metric})"
        groups = [[Col(f"{metric} ±stderr", value), Col("Δ ±stderr (paired)", delta), Col("verdict", verdict, "left")],
                  [Col("kept %", kept)], *beside.get(task, [])]  # how far the output moved, on the same tokens
        specs.append(TableSpec(f"{title} — {name}" if len(heads) > 1 or task != metric else title,
                               [removed], [*groups, [angular]], sections=sections))
    if len(verdicts) > 1:
        specs.append(_across_tasks(title, removed, layers, verdicts))
    if len(unit_kinds(frame)) > 1:
        specs += [_units_side_by_side(frame, task, metric, title) for task, metric in heads]
    return Tables(*specs)


#: How a unit kind is named in tables, plots and summaries.
UNIT_NAMES = {"block": "block", "attn": "attention", "mlp": "MLP"}


def _delta_shown(row: pd.Series, metric: str) -> str:
    """Δ as the plots draw it: a perplexity as % of the baseline, accuracy in points, else in its units."""
    kind, scale = _units(metric, float(row["baseline"]))
    if kind == "units" or not math.isfinite(float(row["delta"])):
        return _signed(row["delta"], row["baseline"])
    return f"{float(row['delta']) * scale:+.2f}{'%' if kind == 'relative' else ' pt'}"


def _removed_text(part: pd.DataFrame) -> str:
    """A variant's row key: ``baseline``, ``3`` (block 3), ``3.attn``, ``3.mlp``."""
    layer = part["removed_layer"].iloc[0]
    if pd.isna(layer):
        return "baseline"
    unit = part["unit"].iloc[0] if "unit" in part else "block"
    return str(int(layer)) if unit in ("block", None) or pd.isna(unit) else f"{int(layer)}.{unit}"


def _units_side_by_side(frame: pd.DataFrame, task: str, metric: str, title: str) -> TableSpec:
    """Each layer's block, attention and MLP removed side by side on one metric: Δ and verdict of each
    (KL and its verdict on a comparison task) — where a block's harm lives."""
    rows = frame[(frame["task"] == task) & (frame["metric"] == metric)]
    kinds = unit_kinds(frame)
    by_kind = {k: of_unit(rows, k).set_index(of_unit(rows, k)["removed_layer"].astype(int)) for k in kinds}
    layers = sorted({int(i) for part in by_kind.values() for i in part.index})
    groups = []
    for kind in kinds:
        part = by_kind[kind]
        delta, verdict = [], []
        for i in layers:
            r = part.loc[i] if i in part.index else None
            if r is None:
                delta.append("")
                verdict.append("")
                continue
            shown = _kl_text(r["value"], r["delta_stderr"]) if metric == "kl" else _delta_shown(r, metric)
            delta.append(shown)
            verdict.append(_verdict(r["verdict"]))
        head = "KL" if metric == "kl" else "Δ"
        groups.append([Col(f"{UNIT_NAMES[kind]} {head}", delta), Col(f"{UNIT_NAMES[kind]} verdict", verdict, "left")])
    name = task if task == metric else f"{task} ({metric})"
    return TableSpec(f"{title} — {name}: block, attention and MLP side by side",
                     [Col("layer", [str(i) for i in layers])], groups)


def _comparison_cols(frame: pd.DataFrame, variants: list[tuple[Any, pd.DataFrame]], layers: list[Any],
                     task: str) -> list[Col]:
    """KL to the full model (its verdict) and top-1 agreement per variant on a comparison task; along
    generated continuations also the tokens reproduced before the first disagreement."""
    kind = comparison_of(task)[0]
    label = "gen. " if kind == BUILTIN_GENERATION_TASK else ""
    kl, verdict, top1, run = [], [], [], []
    for (_, part), layer in zip(variants, layers, strict=True):
        rows = {r["metric"]: r for _, r in part[part["task"] == task].iterrows()}
        k, t, f = rows.get("kl"), rows.get("top1"), rows.get("first_miss")
        kl.append("" if k is None or pd.isna(layer) else _kl_text(k["value"], k["delta_stderr"]))
        verdict.append(None if k is None or pd.isna(layer) else k["verdict"])
        top1.append("" if t is None or pd.isna(layer) else f"{100 * t['value']:.1f}")
        run.append("" if f is None else f"{f['value']:.1f}")
    cols = [Col(f"{label}KL nats ±stderr", kl), Col(f"{label}KL verdict", verdict, "left"),
            Col(f"{label}top-1 %", top1)]
    if kind == BUILTIN_GENERATION_TASK:
        cols.append(Col("tokens to 1st miss", run))
    return cols


def _kl_text(value: float, stderr: float) -> str:
    """A KL in nats with 3 significant digits (they span decades: 1e-4 for a dead layer, 1 for the first)."""
    if not math.isfinite(value):
        return "–"
    text = f"{value:.3g}"
    return text + (f" ±{stderr:.2g}" if math.isfinite(stderr) else "")


def _across_tasks(title: str, removed: Col, layers: list[Any],
                  verdicts: dict[str, list[str | None]]) -> TableSpec:
    """Each layer's verdict on every task, and whether it is dead weight on all of them."""
    key = Col("removed", [cell for cell, layer in zip(removed.cells, layers, strict=True) if pd.notna(layer)])
    per_task = {task: values for task, values in verdicts.items() if len(values) == len(key.cells)}
    dead = [sum(v[j] == "dead" for v in per_task.values()) for j in range(len(key.cells))]
    n = len(per_task)
    summary = Col("dead on", ["[green]all: dead weight[/green]" if d == n else f"{d} of {n}" for d in dead], "left")
    groups = [[Col(task, [_verdict(v) for v in values], "left")] for task, values in per_task.items()]
    return TableSpec(f"{title} — verdicts across tasks", [key, summary], groups)


def prune_summary(frame: pd.DataFrame, tasks: list[str]) -> list[str]:
    """Per headline metric (and unit kind, when sub-layers were removed): how many removed units are dead /
    hurt / help / inconclusive, and which."""
    heads = headline_metrics(frame, tasks)
    return [_summary_line(frame, task, metric, kind) for task, metric in heads for kind in unit_kinds(frame)]


def _summary_line(frame: pd.DataFrame, task: str, metric: str, kind: str) -> str:
    """One metric's verdicts over the removed units of one kind."""
    part = of_unit(frame[(frame["task"] == task) & (frame["metric"] == metric)], kind)
    counts = {v: layers_with(frame, task, metric, v, kind) for v in VERDICT_STYLE}
    what = {"block": "removed layers", "attn": "removed attention sub-layers", "mlp": "removed MLP sub-layers"}[kind]
    line = (f"{task} ({metric}), {len(part)} {what}: " +
            ", ".join(f"{len(layers)} {name}" for name, layers in counts.items()))
    dead_name = {"block": "dead weight", "attn": "dead attention", "mlp": "dead MLP"}[kind]
    if counts["dead"]:
        line += f"; {dead_name}: {', '.join(map(str, counts['dead']))}"
    if counts["helps"]:
        line += f"; removing {', '.join(map(str, counts['helps']))} significantly improves it"
    needed = part.loc[part["verdict"] == "inconclusive", "documents_needed"].dropna()
    if len(needed):
        line += (f"; inconclusive: the data cannot tell (≈{int(needed.median()):,} documents would show "
                 "equivalence with 80% power at the observed spread, if it holds)")
    return line


#: How each verdict is drawn: colour (Okabe-Ito), marker, filled, and its legend entry.
VERDICT_MARK = {
    "dead": (PALETTE["green"], "o", True, "dead: 90% interval within the margin"),
    "hurts": (PALETTE["vermillion"], "v", True, "hurts: significantly worse (Holm)"),
    "helps": (PALETTE["blue"], "^", True, "helps: significantly better (Holm)"),
    "inconclusive": (PALETTE["grey"], "o", False, "inconclusive: neither"),
}
ERROR_BAR_LABEL = "error bars: paired 90% interval of Δ"


def _units(metric: str, baseline: float) -> tuple[str, float]:
    """How Δ is drawn: perplexity-like metrics as % of the baseline (a ratio is what they mean), metrics in
    [0, 1] (accuracy) in points, anything else in its own units."""
    if base_metric(metric) in PERPLEXITY_LIKE:
        return "relative", 100.0 / baseline
    if base_metric(metric) not in LOG_LIKELIHOOD and 0.0 <= baseline <= 1.0:
        return "points", 100.0
    return "units", 1.0


def _removal_panel(ax: Any, part: pd.DataFrame, metric: str, num_layers: int) -> dict[str, int]:
    """Δ per removed layer with its paired 90% interval, each layer's verdict as its marker, the margin of
    equivalence shaded; symlog (linear within the margin) when one layer would flatten the rest."""
    x = part["removed_layer"].astype(int).to_numpy()
    baseline = float(part["baseline"].iloc[0])
    kind, scale = _units(metric, baseline)
    delta = part["delta"].to_numpy(dtype=float) * scale
    low = part["ci90_low"].to_numpy(dtype=float) * scale
    high = part["ci90_high"].to_numpy(dtype=float) * scale
    known = np.isfinite(low) & np.isfinite(high)
    margin = float(part["margin"].iloc[0]) * scale
    margin = margin if math.isfinite(margin) and margin > 0 else math.nan
    if math.isfinite(margin):
        ax.axhspan(-margin, margin, color=PALETTE["green"], alpha=0.13, lw=0, zorder=0)
    ax.axhline(0, color="black", lw=0.6, zorder=1)
    ax.plot(x, delta, color="0.75", lw=0.6, zorder=1)
    if known.any():
        ax.errorbar(x[known], delta[known], yerr=np.vstack([delta[known] - low[known], high[known] - delta[known]]),
                    fmt="none", ecolor="0.2", elinewidth=0.8, capsize=1.5, zorder=4)
    counts = _verdict_marks(ax, x, delta, part)
    spread = np.concatenate([delta, low[known], high[known]])
    floor = margin if math.isfinite(margin) else 0.0
    unit = {"relative": "% of baseline", "points": "points", "units": metric}[kind]
    label = f"Δ{metric} ({unit})"
    if large_spread(spread, floor):
        linthresh = floor or float(np.nanmedian(np.abs(delta))) or 1.0
        ax.set_yscale("symlog", linthresh=linthresh, linscale=1.0)
        label += f"\nsymlog, linear within ±{linthresh:.3g}{'%' if kind == 'relative' else ''}"
    ax.yaxis.set_major_formatter(signed_formatter("%" if kind == "relative" else ""))
    ax.set_ylabel(label)
    ax.margins(y=0.08)
    _layers_along_x(ax, num_layers)
    return counts


def _kl_panel(ax: Any, part: pd.DataFrame, metric: str, num_layers: int) -> dict[str, int]:
    """KL to the full model per removed layer on a log axis (it spans decades), its paired 90% interval
    (a lower bound at or below 0 drawn to the bottom), the margin under which a layer can be dead shaded."""
    x = part["removed_layer"].astype(int).to_numpy()
    kl = part["value"].to_numpy(dtype=float)
    high = part["ci90_high"].to_numpy(dtype=float)
    low = part["ci90_low"].to_numpy(dtype=float)
    margin = float(part["margin"].iloc[0])
    positive = kl[np.isfinite(kl) & (kl > 0)]
    floor = min([margin / 10, *(positive / 3)]) if math.isfinite(margin) and margin > 0 else (
        float(positive.min()) / 3 if positive.size else 1e-6)
    shown = np.maximum(kl, floor)
    ax.set_yscale("log")
    if math.isfinite(margin) and margin > 0:
        ax.axhspan(floor / 2, margin, color=PALETTE["green"], alpha=0.13, lw=0, zorder=0)
    ax.plot(x, shown, color="0.75", lw=0.6, zorder=1)
    known = np.isfinite(high) & np.isfinite(low)
    if known.any():
        bottom = np.maximum(low[known], floor / 2)
        ax.errorbar(x[known], shown[known], yerr=np.vstack([np.maximum(shown[known] - bottom, 0),
                                                            np.maximum(high[known] - shown[known], 0)]),
                    fmt="none", ecolor="0.2", elinewidth=0.8, capsize=1.5, zorder=4)
    counts = _verdict_marks(ax, x, shown, part)
    ax.set_ylabel("KL (nats), log scale")
    _layers_along_x(ax, num_layers)
    return counts


def _verdict_marks(ax: Any, x: np.ndarray, y: np.ndarray, part: pd.DataFrame) -> dict[str, int]:
    """Each removed layer's point drawn with its verdict's marker; how many layers got each verdict."""
    verdicts = part["verdict"].fillna("").to_numpy(dtype=str)
    counts = {}
    for verdict, (color, marker, filled, _label) in VERDICT_MARK.items():
        sel = verdicts == verdict
        counts[verdict] = int(sel.sum())
        if sel.any():
            ax.plot(x[sel], y[sel], ls="none", marker=marker, ms=4, mec=color, mew=0.9,
                    mfc=color if filled else "white", zorder=3)
    return counts


def _layers_along_x(ax: Any, num_layers: int) -> None:
    """The removed layer on the x axis: one tick per layer, light vertical grid."""
    ax.set_xlim(-0.6, num_layers - 0.4)
    layer_axis(ax.xaxis, num_layers)
    ax.grid(True, axis="x", which="major", alpha=0.15)


@styled
def prune_figure(frame: pd.DataFrame, tasks: list[str], title: str = "") -> Any:
    """Δ per removed layer, one panel per task, each layer marked with its verdict (dead / hurts / helps /
    inconclusive), its paired 90% interval as the error bar and the margin of equivalence shaded.

    Perplexity-like metrics are drawn as % of the baseline, accuracy in points; on a symmetric-log axis
    (linear within the margin) when one removal dwarfs the others, so every layer stays readable. KL to
    the full model (``fidelity``, ``generation``) gets a panel on a log axis; its percentiles, top-1 and
    first disagreement stay in the CSV.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    heads = headline_metrics(frame, tasks)
    kinds = unit_kinds(frame)
    panels = [(task, metric, kind) for task, metric in heads for kind in kinds]  # block, attention, MLP per task
    removed = pd.to_numeric(frame["removed_layer"], errors="coerce").dropna()
    num_layers = int(removed.max()) + 1 if len(removed) else 1
    fig, axes = figure(DOUBLE_COLUMN, 0.7 + (2.1 if len(panels) <= 3 else 1.7) * len(panels), nrows=len(panels),
                       sharex=True)
    for ax, (task, metric, kind) in zip(axes[:, 0], panels, strict=True):
        part = of_unit(frame[(frame["task"] == task) & (frame["metric"] == metric)], kind)
        compared = comparison_of(task)
        panel = _kl_panel if compared is not None else _removal_panel
        counts = panel(ax, part, metric, num_layers) if len(part) else {}
        name = (task if task == metric else f"{task} ({metric})") if compared is None else _kl_title(*compared)
        if len(kinds) > 1 or kind != "block":
            name += f", {UNIT_NAMES[kind]} removed"
        ax.set_title(f"{name}: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    axes[-1, 0].set_xlabel("removed layer ℓ (0-based)")
    handles = [Line2D([], [], ls="none", marker=m, ms=4, mec=c, mfc=c if f else "white", label=lab)
               for c, m, f, lab in VERDICT_MARK.values()]
    handles += [Patch(color=PALETTE["green"], alpha=0.25, lw=0, label="margin of equivalence"),
                Line2D([], [], ls="none", color="0.2", marker="|", ms=7, mew=0.8, label=ERROR_BAR_LABEL)]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, columnspacing=1.2)
    if title:
        fig.suptitle(wrap(title, DOUBLE_COLUMN, 9))
    return fig


def _kl_title(kind: str, on: str) -> str:
    """A KL panel's title: on the perplexity text, along continuations, on a task's tokens."""
    where = "the text" if on == "ppl" else on
    return f"KL(full ‖ variant) {'along continuations of ' if kind == BUILTIN_GENERATION_TASK else 'on '}{where}"


def plot_prune(frame: pd.DataFrame, tasks: list[str], stem: Path, title: str = "") -> list[Path]:
    """:func:`prune_figure` as ``stem``.png (a glance) and .pdf (vector, for a paper)."""
    return save_figure(prune_figure(frame, tasks, title), stem)


def latex_table(frame: pd.DataFrame, tasks: list[str], caption: str = "") -> str:
    heads = headline_metrics(frame, tasks)
    rows = []
    for _, part in frame.groupby("variant", sort=False):
        layer = part["removed_layer"].iloc[0]
        row: dict[str, Any] = {"removed layer": "none" if pd.isna(layer) else _removed_text(part)}
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


def write_prune_report(frame: pd.DataFrame, tasks: list[str], out: Path, *, plots: bool = True,
                       title: str = "") -> list[Path]:
    """prune.tex and (with ``plots``, once a layer is removed) prune.png/pdf: what a person reads."""
    files = [atomic_write(out / "prune.tex", latex_table(frame, tasks))]
    if plots and any(len(of_unit(frame, kind)) for kind in unit_kinds(frame)):
        files += plot_prune(frame, tasks, out / "prune", title)
    return files
