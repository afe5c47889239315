"""Removing n layers at once (``lnsdiag shrink``): the pruning-curve table, summary, LaTeX and plot.

The input is the run's tidy table (:mod:`lnsdiag.runners.shrink_table`: its shape, and the CSVs the run
writes itself). Strategies are listed and styled by their place in the registry
(:mod:`lnsdiag.runners.strategies`, plain data), so a new one needs nothing here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..interventions.units import Removal
from ..results.margins import PERPLEXITY_LIKE, base_metric, margin_kind
from ..results.verdict import headline_metrics
from ..runners.shrink_table import FULL, is_full, metric_row, strategies_in, strategy_rows
from ..runners.strategies import GIVEN, names, registered
from ..runs import atomic_write
from .common import (
    DOUBLE_COLUMN,
    PALETTE,
    SINGLE_COLUMN,
    TITLE_INSET,
    Col,
    LatexRaw,
    Tables,
    TableSpec,
    figure,
    frame_to_latex,
    latex_escape,
    save_figure,
    signed_formatter,
    styled,
    wrap,
)
from .prune import _digits, _fmt, _signed, _units, _verdict

#: How strategies are drawn, by their place in the registry: an Okabe–Ito colour and a marker each. Names
#: the registry does not know (an old CSV's) take the styles after the registered ones.
MARKS = ((PALETTE["blue"], "o"), (PALETTE["vermillion"], "s"), (PALETTE["green"], "^"), (PALETTE["orange"], "D"),
         (PALETTE["purple"], "v"), (PALETTE["black"], "X"), (PALETTE["grey"], "*"), (PALETTE["yellow"], "h"))
#: An explicit set's style and legend entry (it is no registered strategy).
GIVEN_MARK = (PALETTE["sky"], "P", "given: the layers asked for")
ERROR_BARS = "error bars: full model + paired 90% interval of Δ"
#: The widest a removed-layer list is shown in the terminal table (the CSV keeps every layer).
REMOVED_WIDTH = 20
#: The widest a value column's header is: longer "task metric" names show the task, the caption the metric.
HEADER_WIDTH = 14


# --- removed layers ---------------------------------------------------------------------------------

def layer_runs(text: Any, dash: str = "–") -> str:
    """``"3,4,7,12,13,14,15"`` as ``"3,4,7,12–15"``: runs of three or more layers as first–last; sub-layers
    by kind after the blocks, runs the same way (``"5–10.attn,2.mlp"``)."""
    removal = Removal.from_cell(text)
    parts = _runs(list(removal.blocks), dash, "")
    for kind in ("attn", "mlp"):
        parts += _runs([u.block for u in removal.sublayers if u.kind == kind], dash, f".{kind}")
    return ",".join(parts)


def _runs(layers: list[int], dash: str, suffix: str) -> list[str]:
    """Ascending ``layers`` as parts, runs of three or more as first–last, each with ``suffix``."""
    parts: list[str] = []
    i = 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{layers[i]}{dash}{layers[j]}{suffix}")
        else:
            parts += [f"{x}{suffix}" for x in layers[i:j + 1]]
        i = j + 1
    return parts


def _removed_cell(text: Any, width: int = REMOVED_WIDTH) -> str:
    """Runs abbreviated; a list still longer than ``width`` keeps its ends around an ellipsis."""
    short = layer_runs(text)
    if not short:
        return "none"
    parts = short.split(",")
    if len(short) <= width or len(parts) <= 2:
        return short
    head, tail = [parts[0]], [parts[-1]]
    lo, hi = 1, len(parts) - 2
    while lo <= hi:
        grow_head = len(",".join(head)) <= len(",".join(tail))
        part = parts[lo] if grow_head else parts[hi]
        if len(",".join([*head, "…", *tail])) + len(part) + 1 > width:
            break
        if grow_head:
            head.append(part)
            lo += 1
        else:
            tail.insert(0, part)
            hi -= 1
    return ",".join([*head, "…", *tail])


# --- shared pieces ------------------------------------------------------------------------------------

def _mark(strategy: str, strategies: list[str]) -> tuple[str, str, str]:
    """Colour, marker and legend entry: a registered strategy's by its place in the registry."""
    if strategy == GIVEN:
        return GIVEN_MARK
    known = names()
    if strategy in known:
        color, marker = MARKS[known.index(strategy) % len(MARKS)]
        return color, marker, f"{strategy}: {registered(strategy).legend}"
    spare = MARKS[len(known):] or MARKS
    others = [s for s in strategies if s not in known and s != GIVEN]
    color, marker = spare[others.index(strategy) % len(spare)]
    return color, marker, strategy


def metric_name(task: str, metric: str) -> str:
    return task if task == metric else f"{task} ({metric})"


def finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _higher_is_better(frame: pd.DataFrame, task: str, metric: str) -> bool:
    sel = frame.loc[(frame["task"] == task) & (frame["metric"] == metric), "higher_is_better"].dropna()
    return bool(sel.iloc[0]) if len(sel) else base_metric(metric) not in PERPLEXITY_LIKE


def _best(frame: pd.DataFrame, task: str, metric: str) -> dict[int, tuple[float, list[str]]]:
    """Per n: the best value any strategy kept, and the strategies that kept it (ties: the same layers)."""
    sel = frame[(frame["task"] == task) & (frame["metric"] == metric) & ~is_full(frame)]
    higher = _higher_is_better(frame, task, metric)
    order = strategies_in(frame)
    out = {}
    for n, part in sel.groupby("n_removed"):
        part = part[np.isfinite(part["value"].to_numpy(dtype=float))]
        if part.empty:
            continue
        best = float(part["value"].max() if higher else part["value"].min())
        close = np.isclose(part["value"].to_numpy(dtype=float), best, rtol=1e-9, atol=0.0)
        winners = set(part.loc[close, "strategy"])
        out[int(n)] = (best, [s for s in order if s in winners])
    return out


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def delta_unit(metric: str, baseline: Any) -> tuple[str, float]:
    """Δ as the paper reads it: perplexity-like in % of the full model, accuracy-like in points."""
    if not finite(baseline) or float(baseline) == 0:
        return "", 1.0
    kind, scale = _units(metric, float(baseline))
    return {"relative": "%", "points": "pt"}.get(kind, ""), scale


def delta_text(delta: Any, metric: str, baseline: Any) -> str:
    """Δ in :func:`_delta_unit`'s unit (the column's header names it)."""
    if not finite(delta):
        return "–"
    unit, scale = delta_unit(metric, baseline)
    if not unit:
        return _signed(float(delta), float(baseline) if finite(baseline) else 1.0)
    x = float(delta) * scale
    d = 0 if abs(x) >= 100 else 1 if abs(x) >= 10 else 2
    return f"{x:+,.{d}f}"


# --- terminal -----------------------------------------------------------------------------------------

def shrink_table(frame: pd.DataFrame, tasks: list[str], title: str = "Removing n layers at once") -> Tables:
    """The full model, then each strategy's n = 1..N: removed layers, and per headline metric its value
    (the best at each n in bold), Δ to the full model and the verdict."""
    heads = headline_metrics(frame, tasks)
    rows = strategy_rows(frame)
    strategy, n_col, removed, sections = [], [], [], set()
    for i, (name, n, layers, _part) in enumerate(rows):
        first = i == 0 or rows[i - 1][0] != name
        strategy.append(name if first else "")
        n_col.append(str(n))
        removed.append("none" if name == FULL else _removed_cell(layers))
        if i + 1 < len(rows) and rows[i + 1][0] != name:
            sections.add(i)
    groups, named = [], []
    for task, metric in heads:
        best = _best(frame, task, metric)
        base = frame.loc[(frame["task"] == task) & (frame["metric"] == metric), "baseline"].dropna()
        unit, _scale = delta_unit(metric, base.iloc[0] if len(base) else math.nan)
        value, delta, verdict = [], [], []
        for name, n, _layers, part in rows:
            r = metric_row(part, task, metric)
            if r is None:
                value.append("–")
                delta.append("")
                verdict.append("")
                continue
            text = _fmt(r["value"], scale=r["baseline"] if finite(r["baseline"]) else None)
            if name != FULL and n in best and name in best[n][1]:
                text = f"[bold]{text}[/bold]"
            value.append(text)
            delta.append("" if name == FULL else delta_text(r["delta"], metric, r["baseline"]))
            verdict.append("" if name == FULL else _verdict(r["verdict"]))
        label = task if task == metric else f"{task} {metric}"
        if len(label) > HEADER_WIDTH:  # the metric goes to the caption: a column as wide as its header
            label = task
            named.append(f"{task} {metric}")
        groups.append([Col(label, value), Col(f"Δ {unit}".strip(), delta), Col("verdict", verdict, "left")])
    caption = ((f"metrics: {', '.join(named)}; " if named else "") +
               "Δ to the full model (perplexity-like: % of it; accuracy-like: points); bold: the best at each n; "
               "every removed layer (and each strategy's own criterion) is in shrink.csv")
    key = [Col("strategy", strategy, "left"), Col("n", n_col), Col("removed", removed, "left")]
    return Tables(TableSpec(title, key, groups, caption=caption, sections=frozenset(sections)))


def shrink_summary(frame: pd.DataFrame, tasks: list[str]) -> list[str]:
    """Per headline metric: which strategy kept the most at each n, and the largest n at which some removal is
    still dead (equivalent to the full model within the margin), or that none is."""
    lines = []
    full = is_full(frame)
    for task, metric in headline_metrics(frame, tasks):
        sel = frame[(frame["task"] == task) & (frame["metric"] == metric) & ~full]
        if sel.empty:
            continue
        best = _best(frame, task, metric)
        base = frame.loc[(frame["task"] == task) & (frame["metric"] == metric), "baseline"].dropna()
        scale = float(base.iloc[0]) if len(base) else None
        picks = "; ".join(f"n = {n}: {_and(who)} ({_fmt(value, scale=scale)})"
                          for n, (value, who) in best.items())
        full_value = "" if scale is None else f": full model {_fmt(scale, scale=scale)};"
        line = f"{metric_name(task, metric)}{full_value} best kept at each n — {picks}."
        dead = sel[sel["verdict"] == "dead"]
        top = int(sel["n_removed"].max())
        n_dead = 0
        if len(dead):
            n_dead = int(dead["n_removed"].max())
            who = [s for s in strategies_in(frame) if s in set(dead.loc[dead["n_removed"] == n_dead, "strategy"])]
            line += (f" Largest n still dead (equivalent to the full model within the margin): {n_dead} of {top}, "
                     f"by {_and(who)}.")
        else:
            line += (f" No removal of 1–{top} layers is dead: none is shown equivalent to the full model within "
                     "the margin.")
        beyond = sel[(sel["verdict"] == "inconclusive") & (sel["n_removed"] > n_dead)]
        if len(beyond):
            at = sorted(int(n) for n in beyond["n_removed"].unique())
            many = len(beyond) > 1
            line += (f" {len(beyond)} removal{'s' if many else ''}{' with more layers' if n_dead else ''} "
                     f"{'are' if many else 'is'} inconclusive (n = {', '.join(map(str, at))}): the data cannot "
                     "tell, which is not 'no effect'.")
        lines.append(line)
    return lines


def healed_rows(frame: pd.DataFrame, healed: pd.DataFrame, method: str) -> pd.DataFrame:
    """The full model's rows and the picks healed by ``method``: what the healed table and curves show."""
    return pd.concat([frame[is_full(frame)], healed[healed["heal"] == method]], ignore_index=True)


# --- LaTeX --------------------------------------------------------------------------------------------

def shrink_latex(frame: pd.DataFrame, tasks: list[str], caption: str = "") -> str:
    """value ± stderr per strategy and n for each headline metric; the best at each n in bold, dead removals
    marked with a dagger."""
    heads = headline_metrics(frame, tasks)
    best = {head: _best(frame, *head) for head in heads}
    records = []
    for name, n, layers, part in strategy_rows(frame):
        record: dict[str, Any] = {"strategy": "full model" if name == FULL else name, "n": n,
                                  "removed layers": LatexRaw(latex_escape(layer_runs(layers, "--") or "none"))}
        for task, metric in heads:
            r = metric_row(part, task, metric)
            column = f"{task} {metric}" if task != metric else task
            if r is None or not finite(r["value"]):
                record[column] = ""
                continue
            d = _digits(r["baseline"] if finite(r["baseline"]) else r["value"])
            text = f"{r['value']:.{d}f}"
            if finite(r["stderr"]):
                text += rf" $\pm$ {r['stderr']:.{d}f}"
            if name != FULL and n in best[(task, metric)] and name in best[(task, metric)][n][1]:
                text = rf"\textbf{{{text}}}"
            if name != FULL and r["verdict"] == "dead":
                text += r"$^\dagger$"
            record[column] = LatexRaw(text)
        records.append(record)
    caption = caption or (r"Removing $n$ layers at once, chosen by each strategy: metric $\pm$ stderr. Bold: the "
                          r"best at each $n$; $^\dagger$: dead (the paired 90\% interval of $\Delta$ to the full "
                          r"model lies within the margin of equivalence).")
    return frame_to_latex(pd.DataFrame(records, dtype=object), caption=caption, label="tab:shrink")


def write_shrink_report(frame: pd.DataFrame, tasks: list[str], out: Path, *, plots: bool = True,
                        title: str = "", healed: pd.DataFrame | None = None) -> list[Path]:
    """shrink.tex and (with ``plots``, once something is removed) shrink.png/pdf: what a person reads; the
    healed picks as a second LaTeX table and dashed curves."""
    latex = shrink_latex(frame, tasks)
    if healed is not None and len(healed):
        for method in pd.unique(healed["heal"]):
            latex += "\n" + shrink_latex(healed_rows(frame, healed, method), tasks, caption=(
                rf"Removing $n$ layers at once, each pick healed ({method}, no training): metric $\pm$ stderr. "
                r"Bold: the best at each $n$; $^\dagger$: dead (the paired 90\% interval of $\Delta$ to the full "
                r"model lies within the margin of equivalence).")).replace("tab:shrink", f"tab:shrink-healed-{method}")
    files = [atomic_write(out / "shrink.tex", latex)]
    if plots and (~is_full(frame)).any() and headline_metrics(frame, tasks):
        files += plot_shrink(frame, tasks, out / "shrink", title, healed)
    return files


# --- figure -------------------------------------------------------------------------------------------

def _log_axis(values: np.ndarray) -> bool:
    values = values[np.isfinite(values)]
    return bool(len(values)) and bool((values > 0).all()) and float(values.max()) > 10 * float(values.min())


def _near_chance(values: np.ndarray, baseline: float, chance: float) -> bool:
    values = values[np.isfinite(values)]
    return bool(len(values)) and math.isfinite(baseline) and float(np.abs(values - chance).min()) <= 0.5 * abs(
        baseline - chance)


def _curve_panel(ax: Any, frame: pd.DataFrame, task: str, metric: str, top: int, strategies: list[str],
                 healed: pd.DataFrame | None = None) -> bool:
    """One headline metric: a line per strategy from the full model (n = 0) on, dead removals filled, error
    bars of the paired 90% interval; each healed strategy dashed beside it; returns whether a chance level
    was drawn."""
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter

    rows = frame[(frame["task"] == task) & (frame["metric"] == metric)]
    full = rows[is_full(rows)]
    base = rows["baseline"].dropna()
    baseline = float(full["value"].iloc[0]) if len(full) else float(base.iloc[0]) if len(base) else math.nan
    margin = rows["margin"].dropna()
    margin = float(margin.iloc[0]) if len(margin) else math.nan
    spread = [baseline]
    step = 0.07 if len(strategies) > 1 else 0.0
    for k, strategy in enumerate(strategies):
        part = rows[(rows["strategy"] == strategy) & ~is_full(rows)].sort_values("n_removed")
        if part.empty:
            continue
        color, marker, _label = _mark(strategy, strategies)
        n = part["n_removed"].to_numpy(dtype=float)
        x = n + step * (k - (len(strategies) - 1) / 2)  # dodged: strategies picking the same layers stay visible
        y = part["value"].to_numpy(dtype=float)
        ax.plot(np.r_[0.0, x], np.r_[baseline, y], color=color, lw=1.0, label=strategy, zorder=3)
        ref = part["baseline"].to_numpy(dtype=float)
        low = ref + part["ci90_low"].to_numpy(dtype=float)
        high = ref + part["ci90_high"].to_numpy(dtype=float)
        known = np.isfinite(low) & np.isfinite(high) & np.isfinite(y)
        if known.any():
            err = np.vstack([np.clip(y[known] - low[known], 0, None), np.clip(high[known] - y[known], 0, None)])
            ax.errorbar(x[known], y[known], yerr=err, fmt="none", ecolor=color, elinewidth=0.7, capsize=0,
                        alpha=0.8, zorder=2)
            spread += list(low[known]) + list(high[known])
        spread += list(y)
        dead = (part["verdict"] == "dead").to_numpy(dtype=bool)
        for sel, filled in ((dead, True), (~dead, False)):
            if sel.any():
                ax.plot(x[sel], y[sel], ls="none", marker=marker, ms=4, mec=color, mew=0.9,
                        mfc=color if filled else "white", zorder=4)
        if healed is not None and len(healed):
            dodge = step * (k - (len(strategies) - 1) / 2)
            spread += _healed_curve(ax, healed, task, metric, strategy, baseline, dodge, color, marker)
    if math.isfinite(baseline):
        if math.isfinite(margin) and margin > 0:
            low = baseline if margin_kind(metric) == "divergence" else baseline - margin  # a KL is never below 0
            ax.axhspan(low, baseline + margin, color=PALETTE["green"], alpha=0.13, lw=0, zorder=0)
        ax.axhline(baseline, ls="--", color="0.25", lw=0.8, label="full model", zorder=1)
    chance = rows["chance"].dropna() if "chance" in rows else pd.Series(dtype=float)
    drew_chance = bool(len(chance)) and math.isfinite(float(chance.iloc[0])) and _near_chance(
        np.asarray(spread, dtype=float), baseline, float(chance.iloc[0]))
    if drew_chance:  # only where some removal gets half-way there: otherwise it would flatten the curves
        ax.axhline(float(chance.iloc[0]), ls=":", color=PALETTE["grey"], lw=0.9, label="chance", zorder=1)
    values = np.asarray(spread, dtype=float)
    higher = _higher_is_better(frame, task, metric)
    label = f"{metric} ({'higher' if higher else 'lower'} is better)"
    if base_metric(metric) in PERPLEXITY_LIKE and _log_axis(values):
        ax.set_yscale("log")
        finite = values[np.isfinite(values)]
        decades = math.log10(float(finite.max()) / float(finite.min()))
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,)))
        ax.yaxis.set_major_formatter(signed_formatter("", signed=False))
        ax.yaxis.set_minor_formatter(NullFormatter())
        label += ", log"
    ax.set_ylabel(label)
    ax.set_xlim(-0.45, top + 0.45)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 4, 5, 10], nbins=min(top + 1, 12)))
    ax.margins(y=0.08)
    ax.set_title(metric_name(task, metric))
    return drew_chance


def _healed_curve(ax: Any, healed: pd.DataFrame, task: str, metric: str, strategy: str, baseline: float,
                  dodge: float, color: str, marker: str) -> list[float]:
    """A strategy's healed picks, dashed in its colour (dead filled, the rest hollow); their values."""
    part = healed[(healed["strategy"] == strategy) & (healed["task"] == task)
                  & (healed["metric"] == metric)].sort_values("n_removed")
    if part.empty:
        return []
    x = part["n_removed"].to_numpy(dtype=float) + dodge
    y = part["value"].to_numpy(dtype=float)
    ax.plot(np.r_[dodge, x], np.r_[baseline, y], color=color, lw=1.0, ls="--", alpha=0.9, zorder=3)
    dead = (part["verdict"] == "dead").to_numpy(dtype=bool)
    for sel, filled in ((dead, True), (~dead, False)):
        if sel.any():
            ax.plot(x[sel], y[sel], ls="none", marker=marker, ms=3.5, mec=color, mew=0.8,
                    mfc=color if filled else "white", zorder=4)
    return list(y)


@styled
def shrink_figure(frame: pd.DataFrame, tasks: list[str], title: str = "", healed: pd.DataFrame | None = None) -> Any:
    """Pruning curves: the metric after removing n layers, one panel per headline metric, one line per
    strategy (its own colour and marker) from the full model at n = 0. Dead removals (equivalent to the full
    model within the margin, shaded) are filled markers, the rest hollow; error bars are the full model plus
    the paired 90% interval of Δ. Perplexity goes on a log axis when it spans more than 10×."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    heads = headline_metrics(frame, tasks)
    strategies = strategies_in(frame)
    removed = frame.loc[~is_full(frame), "n_removed"]
    top = int(removed.max()) if len(removed) else 1
    panels = max(len(heads), 1)
    ncols = 1 if panels == 1 else 2 if panels in (2, 4) else 3
    nrows = math.ceil(panels / ncols)
    width = SINGLE_COLUMN if panels == 1 else DOUBLE_COLUMN
    legend_cols = 2 if width == SINGLE_COLUMN else 3
    handles = [Line2D([], [], color=c, marker=m, ms=4, mfc=c, mec=c, lw=1.0,
                      label=wrap(lab, width / legend_cols - 0.35, 7))
               for c, m, lab in (_mark(s, strategies) for s in strategies)]
    handles += [Line2D([], [], ls="--", color="0.25", lw=0.8, label="full model"),
                Patch(color=PALETTE["green"], alpha=0.25, lw=0,
                      label=wrap("margin of equivalence", width / legend_cols - 0.35, 7)),
                Line2D([], [], ls="none", marker="o", ms=4, mec="0.2", mfc="0.2",
                       label=wrap("filled: dead (90% interval of Δ within the margin)", width / legend_cols - 0.35, 7)),
                Line2D([], [], ls="none", marker="o", ms=4, mec="0.2", mfc="white",
                       label=wrap("hollow: hurts, helps or inconclusive", width / legend_cols - 0.35, 7)),
                Line2D([], [], ls="none", color="0.2", marker="|", ms=7, mew=0.8,
                       label=wrap(ERROR_BARS, width / legend_cols - 0.35, 7))]
    legend_lines = sum(max(h.get_label().count("\n") + 1 for h in handles[i:i + legend_cols])
                       for i in range(0, len(handles), legend_cols))
    fig, axes = figure(width, (2.3 if panels == 1 else 2.1) * nrows + 0.13 * legend_lines + 0.3,
                       nrows=nrows, ncols=ncols)
    chance = False
    for i, (ax, (task, metric)) in enumerate(zip(axes.flat, heads, strict=False)):
        chance |= _curve_panel(ax, frame, task, metric, top, strategies, healed)
        if i + ncols >= len(heads):  # the lowest panel of its column
            ax.set_xlabel(_removed_label(frame))
    for ax in list(axes.flat)[len(heads):]:
        fig.delaxes(ax)
    if chance:
        handles.append(Line2D([], [], ls=":", color=PALETTE["grey"], lw=0.9, label="chance"))
    if healed is not None and len(healed):
        methods = ", ".join(pd.unique(healed["heal"]))
        handles.append(Line2D([], [], ls="--", color="0.2", lw=1.0,
                              label=wrap(f"dashed: healed ({methods})", width / legend_cols - 0.35, 7)))
    fig.legend(handles=handles, loc="outside lower center", ncols=legend_cols, columnspacing=1.0)
    if title:
        fig.suptitle(wrap(title, width - (TITLE_INSET if panels == 1 else 0), 9))
    return fig


def plot_shrink(frame: pd.DataFrame, tasks: list[str], stem: Path, title: str = "",
                healed: pd.DataFrame | None = None) -> list[Path]:
    """:func:`shrink_figure` as ``stem``.png (a glance) and .pdf (vector, for a paper)."""
    return save_figure(shrink_figure(frame, tasks, title, healed), stem)


def _removed_label(frame: pd.DataFrame) -> str:
    """The x axis of the pruning curves: what n counts (layers, or the run's sub-layer kinds)."""
    kinds = set(frame.loc[~is_full(frame), "unit"].dropna()) if "unit" in frame else set()
    if not kinds or kinds == {"block"}:
        return "layers removed n"
    names = {"attn": "attention", "mlp": "MLP", "block": "block"}
    shown = " / ".join(names[k] for k in ("block", "attn", "mlp") if k in kinds) or "mixed"
    return f"units removed n ({shown})" if "mixed" not in kinds else "units removed n (attention and MLP mixed)"
