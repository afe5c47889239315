"""Pre-LN vs LNS report: one summary table, layers side by side, overlay plots, per-model folders."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..runners.reproduce import ReproduceResult
from ..runs import atomic_write, write_csv, write_json
from .common import (
    DOUBLE_COLUMN,
    PALETTE,
    Col,
    Tables,
    TableSpec,
    bar,
    figure,
    frame_to_latex,
    large_spread,
    layer_axis,
    save_figure,
    signed_formatter,
    styled,
    wrap,
)
from .prune import ERROR_BAR_LABEL, _verdict

_COLORS = {"pre-ln": PALETTE["blue"], "lns": PALETTE["vermillion"], "post-ln": PALETTE["green"]}
_MARKERS = {"pre-ln": "o", "lns": "s", "post-ln": "^"}
_RICH = {"pre-ln": "blue", "lns": "red", "post-ln": "green"}


def reproduce_table(result: ReproduceResult, title: str = "") -> Tables:
    """What the paper compares, one column per model (a row per quantity keeps it narrow for any count)."""
    summary = result.summary()
    best = min(r.perplexity for r in result.runs)

    def ppl(value: float) -> str:
        return f"[bold]{value:.2f}[/bold]" if value == best else f"{value:.2f}"

    rows: list[tuple[str, Any]] = [
        ("placement", lambda r: r.placement), ("parameters", lambda r: f"{r.parameters / 1e6:.1f}M"),
        ("final train loss", lambda r: f"{r.final_train_loss:.3f}"),
        ("held-out perplexity", lambda r: ppl(r.heldout_ppl)),
        ("angular distance, deep half", lambda r: f"{r.deep_angular:.3f}"),
        ("near-identity layers", lambda r: str(r.near_identity_layers)),
        ("variance growth, x_L / x_0", lambda r: f"×{r.variance_growth:.3g}"),
        ("‖f(x)‖/‖x‖, deep half", lambda r: f"{r.deep_update_ratio:.3f}"),
        ("Δppl removing a deep layer", lambda r: f"{r.deep_removal_ppl_increase_pct:+.1f}%"),
        ("dead layers", lambda r: str(r.dead_layers))]
    models = list(summary.itertuples())
    key = Col("quantity", [name for name, _ in rows], "left")
    groups = [[Col(str(m.model), [cell(m) for _, cell in rows])] for m in models]
    return Tables(TableSpec(title or "Pre-LN vs LayerNorm Scaling", [key], groups,
                            caption="deep half: the last 50% of the layers; bold: lowest perplexity"))


def reproduce_layers_table(result: ReproduceResult) -> Tables:
    """Each layer's angular distance and removal cost (with its verdict), the models side by side."""
    frame = result.layers()
    top = max(float(frame[f"angular_{r.norm}"].max()) for r in result.runs)
    width = 14 if len(result.runs) <= 2 else 8
    angular, removal = [], []
    for run in result.runs:
        values = frame[f"angular_{run.norm}"].astype(float)
        angular.append(Col(f"ang. dist. {run.label}", [
            f"{v:.3f} [{_RICH.get(run.norm, 'white')}]{bar(v, top, width)}[/]" for v in values], "left"))
        sweep = run.sweep[run.sweep["removed_layer"].notna()].set_index("removed_layer")
        verdicts = frame["layer"].map(sweep["verdict"]) if "verdict" in sweep else pd.Series(None, index=frame.index)
        removal.append(Col(f"Δppl {run.label}", [
            f"{p:+.1f}%" + (f" {_verdict(v)}" if isinstance(v, str) else "")
            for p, v in zip(frame[f"ppl_increase_pct_{run.norm}"], verdicts, strict=True)]))
    return Tables(TableSpec("Per layer (held-out text)", [Col("layer", [str(int(v)) for v in frame["layer"]])],
                            [angular, removal], caption="Δppl: perplexity change when that layer is removed"))


@styled
def reproduce_figure(result: ReproduceResult, title: str = "") -> Any:
    """Four panels, models overlaid: training loss, variance (log), angular distance, removal cost (symlog,
    with each layer's paired 90% interval; hollow markers: the removal is dead weight)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, axes = figure(DOUBLE_COLUMN, 4.9, nrows=2, ncols=2)
    (loss_ax, var_ax), (ang_ax, ppl_ax) = axes
    frame = result.layers()
    L = result.runs[0].num_layers
    margins, spread = [], []
    for k, run in enumerate(result.runs):
        style = {"color": _COLORS.get(run.norm), "marker": _MARKERS.get(run.norm, "o"), "ms": 3}
        curve = run.record.get("train", {}).get("loss_every_10_steps") or []
        loss_ax.plot([10 * i + 1 for i in range(len(curve))], curve, color=style["color"], lw=1.0)
        var = run.variance.layers
        var_ax.plot(var["layer"], var["variance"], **style)
        ang_ax.plot(frame["layer"], frame[f"angular_{run.norm}"], **style)
        sweep = run.sweep[run.sweep["removed_layer"].notna()]
        x = sweep["removed_layer"].to_numpy(dtype=float) + (k - (len(result.runs) - 1) / 2) * 0.18
        scale = 100.0 / sweep["baseline"].to_numpy(dtype=float)
        delta = sweep["delta"].to_numpy(dtype=float) * scale
        low, high = (sweep[c].to_numpy(dtype=float) * scale for c in ("ci90_low", "ci90_high"))
        known = np.isfinite(low) & np.isfinite(high)
        ppl_ax.plot(x, delta, color=style["color"], lw=0.8)
        if known.any():
            ppl_ax.errorbar(x[known], delta[known], fmt="none", ecolor=style["color"], elinewidth=0.8, capsize=1.2,
                            yerr=np.vstack([delta[known] - low[known], high[known] - delta[known]]))
        dead = sweep["dead"].fillna(False).astype(bool).to_numpy()
        for sel, face in ((~dead, style["color"]), (dead, "white")):
            ppl_ax.plot(x[sel], delta[sel], ls="none", marker=style["marker"], ms=3.5, mec=style["color"], mfc=face,
                        mew=0.9, zorder=3)
        margins += list(sweep["margin"].to_numpy(dtype=float) * scale)
        spread += list(delta) + list(low[known]) + list(high[known])
    loss_ax.set(xlabel="training step", ylabel="training loss", title="Training loss")
    var_ax.set_yscale("log")
    var_ax.set(xlabel=f"layer ℓ ({L} = last block's output)", ylabel="variance of $x_\\ell$ (log)",
               title="Residual stream variance")
    ang_ax.set(xlabel="layer ℓ", ylabel="$d(x_\\ell, x_{\\ell+1})$", title="Angular distance to the next layer")
    ang_ax.set_ylim(bottom=0)
    margin = float(np.nanmedian(margins)) if margins else math.nan
    if math.isfinite(margin) and margin > 0:
        ppl_ax.axhspan(-margin, margin, color=PALETTE["green"], alpha=0.13, lw=0, zorder=0)
    ppl_ax.axhline(0, color="black", lw=0.6)
    ylabel = "Δ perplexity (% of the model's)"
    if large_spread(spread, margin if math.isfinite(margin) else 0.0):
        linthresh = margin if math.isfinite(margin) and margin > 0 else 1.0
        ppl_ax.set_yscale("symlog", linthresh=linthresh, linscale=1.0)
        ylabel += f"\nsymlog, linear within ±{linthresh:.3g}%"
    ppl_ax.yaxis.set_major_formatter(signed_formatter())
    ppl_ax.margins(y=0.08)
    ppl_ax.set(xlabel="removed layer ℓ", ylabel=ylabel, title="Cost of removing one layer")
    for ax, count in ((var_ax, L + 1), (ang_ax, L), (ppl_ax, L)):
        layer_axis(ax.xaxis, count)
    handles = [Line2D([], [], color=_COLORS.get(r.norm), marker=_MARKERS.get(r.norm, "o"), ms=3.5, label=r.label)
               for r in result.runs]
    handles += [Line2D([], [], ls="none", marker="o", ms=3.5, mec="0.3", mfc="white", label="hollow: removal is dead"),
                Line2D([], [], ls="none", color="0.3", marker="|", ms=7, mew=0.8, label=ERROR_BAR_LABEL),
                Patch(color=PALETTE["green"], alpha=0.25, lw=0, label="margin of equivalence")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles) if len(handles) <= 5 else 3)
    spec = result.spec
    fig.suptitle(wrap(title or f"{spec.layers} layers, hidden {spec.hidden}, {spec.steps} steps — held-out: "
                      f"{result.eval_text}", DOUBLE_COLUMN, 9))
    return fig


def plot_reproduce(result: ReproduceResult, stem: Path, title: str = "") -> list[Path]:
    """:func:`reproduce_figure` as ``stem``.png (a glance) and .pdf (vector, for a paper)."""
    return save_figure(reproduce_figure(result, title), stem)


def _twin_meta(result: ReproduceResult, run: Any, meta: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in meta.items() if k not in ("models", "summary")},
            "command": "reproduce",
            "model": {"name": run.name, "label": run.label, "source": str(run.path), "norm": run.norm,
                      "parameters": run.parameters},
            "num_layers": run.num_layers, "norm_placement": run.placement, "train": run.record,
            "heldout_perplexity": run.perplexity}


def write_reproduce(result: ReproduceResult, out: Path, meta: dict[str, Any], title: str = "") -> list[Path]:
    """reproduce.csv (summary), reproduce_layers.csv, reproduce.tex, reproduce.png/pdf, meta.json, and one
    folder per model (angular.csv, angular_blocks.csv, variance.csv, ppl_sweep.csv, meta.json) for ``compare``."""
    summary = result.summary()
    files = [write_csv(out / "reproduce.csv", summary), write_csv(out / "reproduce_layers.csv", result.layers())]
    latex = summary[["model", "heldout_ppl", "deep_angular", "near_identity_layers", "variance_growth",
                     "deep_removal_ppl_increase_pct"]].rename(columns={
                         "heldout_ppl": "held-out ppl", "deep_angular": "deep ang. dist.",
                         "near_identity_layers": "near-identity", "variance_growth": "var. growth",
                         "deep_removal_ppl_increase_pct": "deep removal Δppl %"})
    files.append(atomic_write(out / "reproduce.tex", frame_to_latex(
        pd.DataFrame(latex), caption="Models trained identically but for the norm, on held-out text.",
        label="tab:pre-ln-vs-lns")))
    files += plot_reproduce(result, out / "reproduce", title)
    for run in result.runs:
        sub = out / run.norm
        sub.mkdir(parents=True, exist_ok=True)
        files += [write_csv(sub / "angular.csv", run.angular.layers),
                  write_csv(sub / "angular_blocks.csv", run.angular.blocks),
                  write_csv(sub / "variance.csv", run.variance.layers),
                  write_csv(sub / "ppl_sweep.csv", run.sweep),
                  write_json(sub / "meta.json", _twin_meta(result, run, meta))]
    files.append(write_json(out / "meta.json", meta))
    return files
