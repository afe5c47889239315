"""Residual-variance report: table, summary, variance.csv, log-scale plot (the paper's Fig. 9 shape)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..measure.variance import VarianceResult
from ..runs import write_csv, write_json
from .common import (
    DOUBLE_COLUMN,
    PALETTE,
    SINGLE_COLUMN,
    TITLE_INSET,
    Col,
    Tables,
    TableSpec,
    bar,
    figure,
    large_spread,
    layer_axis,
    save_figure,
    styled,
    width_for,
    wrap,
)


def _log_bar(value: float, low: float, high: float, width: int = 24) -> str:
    """A bar on a log scale between ``low`` and ``high`` (variance spans orders of magnitude)."""
    if not (value > 0 and low > 0):
        return ""
    span = math.log(high / low)
    if span <= 0:
        return bar(1.0, 1.0, width)
    return bar(math.log(value / low) + 0.05 * span, 1.05 * span, width)


def variance_table(result: VarianceResult, title: str = "Residual stream per layer",
                   placement: str | None = None) -> Tables:
    """Variance entering each layer and each layer's relative update, both with log-scale bars (the first
    layer's update is often 100 times the others')."""
    df = result.layers
    positive = df.loc[df["variance"] > 0, "variance"]
    low, high = (float(positive.min()), float(positive.max())) if len(positive) else (0.0, 0.0)
    ratios = df["update_ratio"].dropna()
    ratios = ratios[ratios > 0]
    r_low, r_high = (float(ratios.min()), float(ratios.max())) if len(ratios) else (0.0, 0.0)
    last = result.num_layers
    variance, ratio = [], []
    for row in df.itertuples():
        variance.append(f"{row.variance:<9.4g} [magenta]{_log_bar(row.variance, low, high, 16)}[/magenta]")
        ratio.append("" if math.isnan(row.update_ratio) else
                     f"{row.update_ratio:<9.4g} [green]{_log_bar(row.update_ratio, r_low, r_high, 16)}[/green]")
    caption = f"norm placement: {placement}; bars on a log scale" if placement else "bars on a log scale"
    layers = Col("layer", ["output" if v == last else str(v) for v in df["layer"]])
    return Tables(TableSpec(title, [layers], [[Col("variance of x_l", variance, "left"),
                                               Col("RMS", [f"{v:.4g}" for v in df["rms"]]),
                                               Col("update ‖f(x)‖/‖x‖", ratio, "left")]], caption=caption))


def variance_summary(result: VarianceResult) -> str:
    L = result.num_layers
    return (f"Variance grows ×{result.growth:.3g} from the embeddings (input of layer 0) to the output of layer "
            f"{L - 1}. The deepest half of the layers change their input by {result.mean_update_ratio(0.5, 1):.1%} "
            f"on average (‖f(x)‖/‖x‖), the first half by {result.mean_update_ratio(0, 0.5):.1%}. "
            f"Averaged over {result.tokens:,} tokens ({result.token_mode}).")


@styled
def variance_figure(result: VarianceResult, title: str = "") -> Any:
    """Variance of the stream entering each layer (log scale; the paper's Fig. 9 shape), and each layer's
    relative update below (log scale too when the first layer's dwarfs the rest)."""
    df = result.layers
    L = result.num_layers
    width = width_for(L)
    fig, axes = figure(width, 3.6 if width == SINGLE_COLUMN else 4.0, nrows=2, sharex=True,
                       gridspec_kw={"height_ratios": [3, 2]})
    top, low = axes[:, 0]
    top.plot(df["layer"], df["variance"], marker="o", color=PALETTE["blue"], label="variance of $x_\\ell$")
    top.plot(df["layer"], df["rms"] ** 2, ls=":", lw=1, color=PALETTE["grey"], label="mean square of $x_\\ell$")
    top.set_yscale("log")
    top.set_ylabel("variance (log)")
    top.legend(loc="lower right")
    top.set_title(wrap(title or f"Residual stream per layer ({result.token_mode} tokens, n={result.tokens:,})",
                       width - TITLE_INSET))
    ratio = df["update_ratio"].iloc[:L]
    low.plot(df["layer"].iloc[:L], ratio, marker="o", color=PALETTE["green"])
    logscale = large_spread(ratio[ratio > 0], 0.0)
    low.set_ylabel("relative update\n$\\|x_{\\ell+1}-x_\\ell\\| / \\|x_\\ell\\|$" + (" (log)" if logscale else ""))
    if logscale:
        low.set_yscale("log")
    else:
        low.set_ylim(bottom=0)
    low.set_xlabel(f"layer ℓ (0-based; {L}: last block's output, before the final norm)"
                   if width == DOUBLE_COLUMN else f"layer ℓ (0-based; {L}: last block's output)")
    low.set_xlim(-0.6, L + 0.6)
    layer_axis(low.xaxis, L + 1)
    return fig


def plot_variance(result: VarianceResult, stem: Path, title: str = "") -> list[Path]:
    """:func:`variance_figure` as ``stem``.png (a glance) and .pdf (vector, for a paper)."""
    return save_figure(variance_figure(result, title), stem)


def write_variance(result: VarianceResult, out: Path, meta: dict[str, Any], title: str = "") -> list[Path]:
    """variance.csv, meta.json, variance.png/pdf."""
    files = [write_csv(out / "variance.csv", result.csv_frame())]
    files += plot_variance(result, out / "variance", title)
    files.append(write_json(out / "meta.json", meta))
    return files
